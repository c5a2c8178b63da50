"""Check a chain the CA sent before certd stores it.

A CA can send something certd must not deploy: a chain cut short by a proxy, a certificate
for a different key (a bug, or an order mixed up with another one), names other than the ones
asked for, dates that make no sense. :func:`check_issued` refuses all of these with one line
saying what is wrong, so a bad certificate never reaches a server.

It checks the chain's *links* (each certificate signed by the next), not trust: the root is
whatever the operator trusts, and the handshake probe (``certd/verify/handshake.py``) checks trust as served.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from certd.core.clock import utc
from certd.core.errors import CertificateRejected
from certd.crypto.keys import load_private_key
from certd.core.model import Bundle, split_pem_chain, spki_sha256

MAX_CHAIN_BYTES = 1 << 20   # 1 MiB: real chains are a few KiB
MAX_CHAIN_CERTS = 10
CLOCK_SKEW = timedelta(minutes=5)  # a CA's clock may run a little ahead of ours


def check_issued(fullchain_pem: bytes, key_pem: bytes, domains: Sequence[str], now: datetime) -> Bundle:
    """Return the checked :class:`Bundle` for ``fullchain_pem`` (leaf first) and our key.

    Raises :class:`CertificateRejected` when the chain is unreadable, the leaf is not for our
    key or not for exactly ``domains`` (case-insensitive set equality), a certificate is not
    signed by the next one, or the leaf's dates are not sane at ``now``.
    """
    label = domains[0] if domains else "?"
    certs, blocks = _parse_chain(fullchain_pem, label)
    leaf = certs[0]
    _check_key(leaf, key_pem, label)
    _check_names(leaf, domains, label)
    _check_links(certs, label)
    _check_dates(leaf, utc(now), label)
    return Bundle(cert_pem=blocks[0], chain_pem=b"".join(blocks[1:]), key_pem=key_pem)


def _reject(label: str, what: str) -> CertificateRejected:
    return CertificateRejected(f"certificate for {label}: {what}; not stored")


def _parse_chain(pem: bytes, label: str) -> tuple[list[x509.Certificate], list[bytes]]:
    if not isinstance(pem, (bytes, bytearray)):
        raise _reject(label, f"the CA sent {type(pem).__name__}, not PEM bytes")
    if len(pem) > MAX_CHAIN_BYTES:
        raise _reject(label, f"the chain is {len(pem)} bytes, over the {MAX_CHAIN_BYTES}-byte limit")
    if not pem.strip():
        raise _reject(label, "the CA sent an empty chain")
    try:
        blocks = split_pem_chain(bytes(pem))
    except ValueError:
        raise _reject(label, "the chain ends in a truncated PEM certificate") from None
    if not blocks:
        raise _reject(label, "the CA sent no PEM certificate")
    if len(blocks) > MAX_CHAIN_CERTS:
        raise _reject(label, f"the chain holds {len(blocks)} certificates, more than {MAX_CHAIN_CERTS}")
    certs = []
    for i, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise _reject(label, f"certificate {i + 1} of {len(blocks)} in the chain is not valid PEM/DER") from None
    return certs, blocks


def _check_key(leaf: x509.Certificate, key_pem: bytes, label: str) -> None:
    try:
        ours = load_private_key(key_pem).public_key()
    except ValueError:
        raise _reject(label, "our private key is unreadable") from None
    try:
        theirs = spki_sha256(leaf.public_key())
    except ValueError:
        raise _reject(label, "the leaf's public key is of an unsupported type") from None
    if theirs != spki_sha256(ours):
        raise _reject(label, f"the leaf is for another public key (SPKI sha256 {theirs[:16]}…), not ours")


def _check_names(leaf: x509.Certificate, domains: Sequence[str], label: str) -> None:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        got = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        got += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        got = []
    except ValueError:
        raise _reject(label, "the leaf's subjectAltName extension is malformed") from None
    want = [d.lower() for d in domains]
    if set(got) != set(want):
        raise _reject(label, f"SANs [{', '.join(sorted(set(got)))}] differ from requested "
                             f"[{', '.join(sorted(set(want)))}]")


def _check_links(certs: list[x509.Certificate], label: str) -> None:
    for i, (child, parent) in enumerate(zip(certs, certs[1:])):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            why = "bad signature" if isinstance(e, InvalidSignature) else str(e).rstrip(".")
            raise _reject(label, f"chain certificate {i + 1} ({child.subject.rfc4514_string()}) is not "
                                 f"issued by certificate {i + 2} ({parent.subject.rfc4514_string()}): {why}") from None


def _check_dates(leaf: x509.Certificate, now: datetime, label: str) -> None:
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if na <= nb:
        raise _reject(label, f"notAfter {_t(na)} is not after notBefore {_t(nb)}")
    if nb > now + CLOCK_SKEW:
        raise _reject(label, f"not valid before {_t(nb)}, later than now ({_t(now)}) plus "
                             f"{int(CLOCK_SKEW.total_seconds() // 60)} min of clock skew; check the clocks")
    if na <= now:
        raise _reject(label, f"already expired at {_t(na)}")


def _t(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%SZ")

