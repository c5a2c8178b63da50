"""Private keys and CSRs for certificates.

Keys are PEM PKCS#8 bytes everywhere in certd: easy to store, easy to hand to a TLS server.
Nothing here logs or formats key material; errors name the key type, never the key.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certd.config import KEY_TYPES

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES = {"ecdsa-p256": ec.SECP256R1, "ecdsa-p384": ec.SECP384R1}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
_CN_MAX = 64  # RFC 5280 ub-common-name


def generate_private_key(key_type: str) -> bytes:
    """A fresh private key of ``key_type`` (one of :data:`certd.config.KEY_TYPES`) as PEM PKCS#8."""
    key: PrivateKey
    if key_type in _CURVES:
        key = ec.generate_private_key(_CURVES[key_type]())
    elif key_type in _RSA_BITS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    else:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse an unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1); EC and RSA only."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # The library's message may quote parts of the input: keep it out of the error.
        raise ValueError("not a readable unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"unsupported private key type {type(key).__name__}; certd uses EC and RSA keys")
    return key


def make_csr(key_pem: bytes, domains: Sequence[str]) -> bytes:
    """A PEM CSR for ``domains`` signed by ``key_pem``.

    Every domain is a DNS SAN (in order); the first one is also the subject CN when it fits
    the 64-character limit, as some servers still log the CN. The CA takes names from the SANs.
    """
    if not domains:
        raise ValueError("a CSR needs at least one domain")
    key = load_private_key(key_pem)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]
                        if len(domains[0]) <= _CN_MAX else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)
