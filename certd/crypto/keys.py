"""Private keys and CSRs for certificates.

Keys are PEM PKCS#8 bytes everywhere in certd: easy to store, easy to hand to a TLS server.
Nothing here logs or formats key material; errors name the key type, never the key.
"""

from __future__ import annotations

import ipaddress
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


def ip_or_none(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``name`` as an IP address, or None when it is a DNS name."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def make_csr(key_pem: bytes, domains: Sequence[str]) -> bytes:
    """A PEM CSR for ``domains`` (DNS names and IP addresses) signed by ``key_pem``.

    Every name is a SAN in order: an IP address (RFC 8738) as an iPAddress SAN, anything else
    as a DNS SAN. The first DNS name is also the subject CN when it fits the 64-character
    limit, as some servers still log the CN; an IP-only CSR has an empty subject. The CA takes
    names from the SANs.
    """
    if not domains:
        raise ValueError("a CSR needs at least one domain or IP address")
    key = load_private_key(key_pem)
    dns = [d for d in domains if ip_or_none(d) is None]
    sans: list[x509.GeneralName] = [x509.IPAddress(ip) if (ip := ip_or_none(d)) is not None else x509.DNSName(d)
                                    for d in domains]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]
                        if dns and len(dns[0]) <= _CN_MAX else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject)
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)
