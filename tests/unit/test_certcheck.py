"""check_issued: every refusal reason and the happy path, with a throwaway CA made here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certd.crypto.certcheck import MAX_CHAIN_BYTES, check_issued
from certd.core.errors import CertificateRejected
from certd.crypto.keys import generate_private_key, load_private_key

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
DOMAINS = ("www.example.test", "example.test")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Ca:
    """Root -> intermediate, as a CA would have them."""

    root_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    int_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        self.root = self._ca(_name("test root"), self.root_key.public_key(), _name("test root"), self.root_key)
        self.intermediate = self._ca(_name("test intermediate"), self.int_key.public_key(),
                                     _name("test root"), self.root_key)

    @staticmethod
    def _ca(subject: x509.Name, pub: object, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - timedelta(days=30)).not_valid_after(NOW + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    def leaf(self, key_pem: bytes, domains: tuple[str, ...] = DOMAINS, *,
             not_before: datetime = NOW - timedelta(hours=1), not_after: datetime = NOW + timedelta(days=90),
             signer: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(_name(domains[0] if domains else "none"))
                   .issuer_name(self.intermediate.subject)
                   .public_key(load_private_key(key_pem).public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after))
        if domains:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
        return builder.sign(signer or self.int_key, hashes.SHA256())

    def fullchain(self, leaf: x509.Certificate) -> bytes:
        return _pem(leaf) + _pem(self.intermediate)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    return generate_private_key("ecdsa-p256")


def test_good_chain_gives_bundle(ca: Ca, key_pem: bytes) -> None:
    """A chain for our key and exactly our names, correctly linked and in date, is accepted."""
    leaf = ca.leaf(key_pem)
    bundle = check_issued(ca.fullchain(leaf), key_pem, DOMAINS, NOW)
    assert bundle.cert_pem == _pem(leaf)
    assert bundle.chain_pem == _pem(ca.intermediate)
    assert bundle.key_pem == key_pem
    assert set(bundle.info.domains) == set(DOMAINS)


def test_names_compare_case_insensitively_and_in_any_order(ca: Ca, key_pem: bytes) -> None:
    """SANs are a set: order and letter case do not matter."""
    leaf = ca.leaf(key_pem, ("EXAMPLE.test", "www.example.test"))
    check_issued(ca.fullchain(leaf), key_pem, DOMAINS, NOW)


def test_chain_up_to_root_is_accepted(ca: Ca, key_pem: bytes) -> None:
    """A chain that includes the root still links correctly."""
    pem = ca.fullchain(ca.leaf(key_pem)) + _pem(ca.root)
    assert check_issued(pem, key_pem, DOMAINS, NOW).chain_pem.count(b"BEGIN CERTIFICATE") == 2


def test_leaf_alone_is_accepted(ca: Ca, key_pem: bytes) -> None:
    """A leaf without intermediates has no links to check; it is stored with an empty chain."""
    bundle = check_issued(_pem(ca.leaf(key_pem)), key_pem, DOMAINS, NOW)
    assert bundle.chain_pem == b""


def _other_key() -> bytes:
    return generate_private_key("ecdsa-p256")


# (id, build the PEM from (ca, key), the words the one-line message must contain)
REFUSALS: list[tuple[str, Callable[[Ca, bytes], bytes], str]] = [
    ("empty", lambda ca, k: b"", "empty chain"),
    ("whitespace", lambda ca, k: b"\n \n", "empty chain"),
    ("garbage", lambda ca, k: b"<html>502 Bad Gateway</html>", "no PEM certificate"),
    ("truncated", lambda ca, k: ca.fullchain(ca.leaf(k))[:-40], "truncated"),
    ("bad base64", lambda ca, k: b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
     "not valid PEM"),
    ("oversized", lambda ca, k: ca.fullchain(ca.leaf(k)) + b"#" * MAX_CHAIN_BYTES, "limit"),
    ("other key", lambda ca, k: ca.fullchain(ca.leaf(_other_key())), "another public key"),
    ("missing name", lambda ca, k: ca.fullchain(ca.leaf(k, ("www.example.test",))),
     "SANs [www.example.test] differ from requested [example.test, www.example.test]"),
    ("extra name", lambda ca, k: ca.fullchain(ca.leaf(k, DOMAINS + ("evil.test",))), "differ from requested"),
    ("no SAN", lambda ca, k: ca.fullchain(ca.leaf(k, ())), "SANs [] differ"),
    ("wrong order", lambda ca, k: _pem(ca.intermediate) + _pem(ca.leaf(k)), "another public key"),
    ("forged signature", lambda ca, k: ca.fullchain(ca.leaf(k, signer=ec.generate_private_key(ec.SECP256R1()))),
     "bad signature"),
    ("unrelated intermediate", lambda ca, k: _pem(ca.leaf(k)) + _pem(Ca().intermediate), "is not issued by"),
    ("expired", lambda ca, k: ca.fullchain(ca.leaf(k, not_before=NOW - timedelta(days=90),
                                                   not_after=NOW - timedelta(seconds=1))), "already expired"),
    ("from the future", lambda ca, k: ca.fullchain(ca.leaf(k, not_before=NOW + timedelta(hours=1))),
     "clock skew"),
    # cryptography refuses to build notAfter < notBefore; equal dates are just as wrong
    ("zero lifetime", lambda ca, k: ca.fullchain(ca.leaf(k, not_before=NOW - timedelta(hours=1),
                                                         not_after=NOW - timedelta(hours=1))),
     "is not after notBefore"),
]


@pytest.mark.parametrize("build, words", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal(ca: Ca, key_pem: bytes, build: Callable[[Ca, bytes], bytes], words: str) -> None:
    """Each kind of bad chain is refused with one line naming the problem and never the key."""
    with pytest.raises(CertificateRejected) as info:
        check_issued(build(ca, key_pem), key_pem, DOMAINS, NOW)
    msg = str(info.value)
    assert words in msg
    assert msg.startswith("certificate for www.example.test: ") and msg.endswith("; not stored")
    assert "\n" not in msg
    assert b"PRIVATE" not in msg.encode() and key_pem.decode().splitlines()[1] not in msg


def test_small_skew_is_tolerated(ca: Ca, key_pem: bytes) -> None:
    """A notBefore a minute ahead of our clock (the CA's clock runs fast) is fine."""
    leaf = ca.leaf(key_pem, not_before=NOW + timedelta(minutes=1))
    check_issued(ca.fullchain(leaf), key_pem, DOMAINS, NOW)


def test_unreadable_key_is_refused_without_echoing_it(ca: Ca, key_pem: bytes) -> None:
    """A broken key PEM is reported as unreadable; its bytes do not show up in the message."""
    broken = key_pem[:60] + b"SECRETSECRET" + key_pem[60:]
    with pytest.raises(CertificateRejected, match="private key is unreadable") as info:
        check_issued(ca.fullchain(ca.leaf(key_pem)), broken, DOMAINS, NOW)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-2048"])
def test_other_key_types_are_accepted(ca: Ca, key_type: str) -> None:
    """The key comparison works for P-384 and RSA leaf keys too."""
    k = generate_private_key(key_type)
    check_issued(ca.fullchain(ca.leaf(k)), k, DOMAINS, NOW)
