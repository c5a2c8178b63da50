"""Value objects that cross module boundaries: a certificate bundle and the facts read from it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"


def split_pem_chain(pem: bytes) -> list[bytes]:
    """Split concatenated PEM certificates into a list of PEM blocks (each ending in a newline)."""
    blocks: list[bytes] = []
    for part in pem.split(PEM_CERT_BEGIN)[1:]:
        end = part.find(b"-----END CERTIFICATE-----")
        if end < 0:
            raise ValueError("truncated PEM certificate")
        blocks.append(PEM_CERT_BEGIN + part[: end + len(b"-----END CERTIFICATE-----")] + b"\n")
    return blocks


def key_type_of(public_key: object) -> str:
    """``ecdsa-p256`` ... ``rsa-4096`` for a public or private key; ``unknown`` otherwise."""
    if isinstance(public_key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(public_key.curve.name, "unknown")
    if isinstance(public_key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"rsa-{public_key.key_size}"
    return "unknown"


def spki_sha256(public_key: object) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class CertInfo:
    """What an operator (and ``status --json``) needs to know about one leaf certificate."""

    serial: str                 # lower-case hex, no colons
    not_before: datetime        # aware UTC
    not_after: datetime         # aware UTC
    fingerprint_sha256: str     # hex of SHA-256 over the leaf's DER
    spki_sha256: str            # hex of SHA-256 over the SubjectPublicKeyInfo DER
    domains: tuple[str, ...]    # DNS SANs in certificate order
    key_type: str
    issuer: str                 # RFC 4514 string
    ip_addresses: tuple[str, ...] = ()  # IP address SANs (RFC 8738), compressed text form

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Every name the certificate is for: DNS names, then IP addresses."""
        return self.domains + self.ip_addresses

    @property
    def lifetime_seconds(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    @classmethod
    def from_cert(cls, cert: x509.Certificate) -> CertInfo:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            domains = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            domains, ips = (), ()
        pub = cert.public_key()
        return cls(
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            spki_sha256=spki_sha256(pub),
            domains=domains,
            key_type=key_type_of(pub),
            issuer=cert.issuer.rfc4514_string(),
            ip_addresses=ips,
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> CertInfo:
        """Facts about the first certificate in ``pem``."""
        return cls.from_cert(x509.load_pem_x509_certificate(split_pem_chain(pem)[0]))

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "fingerprint_sha256": self.fingerprint_sha256,
                "spki_sha256": self.spki_sha256, "domains": list(self.domains), "key_type": self.key_type,
                "issuer": self.issuer, **({"ip_addresses": list(self.ip_addresses)} if self.ip_addresses else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CertInfo:
        """The inverse of :meth:`to_json`; ValueError/KeyError/TypeError on anything else."""
        not_before, not_after = datetime.fromisoformat(d["not_before"]), datetime.fromisoformat(d["not_after"])
        if not_before.tzinfo is None or not_after.tzinfo is None:
            raise ValueError("naive datetime")
        return cls(str(d["serial"]), not_before, not_after, str(d["fingerprint_sha256"]), str(d["spki_sha256"]),
                   tuple(str(x) for x in d["domains"]), str(d["key_type"]), str(d["issuer"]),
                   tuple(str(x) for x in d.get("ip_addresses", ())))


@dataclass(frozen=True)
class Bundle:
    """A checked certificate with its chain and private key, as stored and deployed.

    ``key_pem`` is secret: never log it, never put it in an error or an audit record.
    """

    cert_pem: bytes      # the leaf only
    chain_pem: bytes     # intermediates, leaf's issuer first
    key_pem: bytes

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem

    @property
    def combined_pem(self) -> bytes:
        """fullchain + key in one file, as HAProxy reads it."""
        return self.fullchain_pem + self.key_pem

    @cached_property
    def info(self) -> CertInfo:
        """Parsed once per bundle (a bundle is immutable): ~0.25 ms a parse adds up at 10,000
        certificates and several looks per rotation."""
        return CertInfo.from_pem(self.cert_pem)

    def with_info(self, info: CertInfo) -> Bundle:
        """This bundle with ``info`` already known (the caller vouches that it belongs to
        ``cert_pem``), so it is never parsed."""
        self.__dict__["info"] = info  # what cached_property would store
        return self

    def __repr__(self) -> str:  # keep the key out of tracebacks and debug logs
        return f"Bundle(serial={self.info.serial}, key=<redacted>)"
