"""Small, real test certificates from a throwaway CA (root -> intermediate -> leaf).

    ca = make_ca()
    leaf = make_leaf(ca, ["www.example.test"])      # leaf.cert_pem, leaf.key_pem, leaf.chain_pem
    bundle = make_bundle(["www.example.test"])      # a certd.core.model.Bundle from a shared CA

ECDSA P-256 by default: generating one takes well under a millisecond.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certd.core.model import Bundle

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A private key of a certd ``key_type`` (ecdsa-p256/p384, rsa-2048/3072/4096)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}")


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def __repr__(self) -> str:
        return f"Issued({self.cert.subject.rfc4514_string()}, serial={self.cert.serial_number:x})"


@dataclass(frozen=True)
class CA:
    """A root and the intermediate that signs leaves."""

    root: Issued
    intermediate: Issued

    @property
    def root_pem(self) -> bytes:
        """Trust anchor, e.g. for a verify endpoint's ca_bundle."""
        return self.root.cert_pem

    @property
    def chain_pem(self) -> bytes:
        """What a CA sends after the leaf: the intermediate."""
        return self.intermediate.cert_pem


@dataclass(frozen=True)
class Leaf(Issued):
    chain_pem: bytes = b""

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem

    @property
    def bundle(self) -> Bundle:
        return Bundle(self.cert_pem, self.chain_pem, self.key_pem)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(name: str = "certd test", *, now: datetime | None = None) -> CA:
    """A fresh root and intermediate (ECDSA P-256), valid from a day before ``now`` for 10 years."""
    now = now or datetime.now(timezone.utc)
    start, end = now - timedelta(days=1), now + timedelta(days=3650)
    root_key, int_key = new_key(), new_key()
    root = (x509.CertificateBuilder().subject_name(_name(f"{name} root")).issuer_name(_name(f"{name} root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(_ski(root_key), critical=False)
            .sign(root_key, hashes.SHA256()))
    inter = (x509.CertificateBuilder().subject_name(_name(f"{name} intermediate")).issuer_name(root.subject)
             .public_key(int_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
             .add_extension(_ski(int_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
             .sign(root_key, hashes.SHA256()))
    return CA(Issued(root, root_key), Issued(inter, int_key))


def make_leaf(ca: CA, domains: Sequence[str], key_type: str = "ecdsa-p256", days: float = 90, *,
              not_before: datetime | None = None, key: PrivateKey | None = None) -> Leaf:
    """A server certificate for ``domains`` (DNS SANs, in order) signed by ``ca``'s intermediate.

    Valid from ``not_before`` (default: an hour ago) for ``days``; ``key`` reuses a key.
    """
    key = key or new_key(key_type)
    start = not_before or datetime.now(timezone.utc) - timedelta(hours=1)
    issuer = ca.intermediate
    cert = (x509.CertificateBuilder().subject_name(_name(domains[0])).issuer_name(issuer.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                           critical=False)
            .sign(issuer.key, hashes.SHA256()))
    return Leaf(cert, key, ca.chain_pem)


@functools.lru_cache(maxsize=1)
def shared_ca() -> CA:
    """One CA per test process, for tests that only need *some* valid chain."""
    return make_ca()


def make_bundle(domains: Sequence[str] = ("www.example.test",), key_type: str = "ecdsa-p256",
                days: float = 90, *, ca: CA | None = None, not_before: datetime | None = None) -> Bundle:
    """A :class:`certd.core.model.Bundle` (leaf, intermediate, key) from ``ca`` or the shared CA."""
    return make_leaf(ca or shared_ca(), domains, key_type, days, not_before=not_before).bundle
