"""Live verification: what does a TLS client connecting to an endpoint actually receive?

A reload hook that exited 0 proves little (nginx answers before its workers switch; a
load balancer may front stale backends), so the rotation's gate is a real handshake:
:func:`await_served` handshakes every endpoint until all of them serve the expected leaf with
a chain that validates against the endpoint's trust anchors and a name that matches the SNI
sent — or raises :class:`~certd.core.errors.VerificationFailed` saying exactly what was served.

:func:`probe` is one look. The common case costs one handshake (~2 ms on loopback): a context
with ``CERT_REQUIRED`` and ``check_hostname``. Only when that fails does it spend more
handshakes to say *why*: one that checks the chain without the name (OpenSSL stops at the first
error, and checks the name before signatures and dates, so a name mismatch says nothing about
the chain), and an unverified one to learn which leaf was served. Python 3.11 exposes only the
leaf (``getpeercert(binary_form=True)``), so chain facts come from OpenSSL's verdict.

Every handshake is a fresh session (no resumption), so each one sees what the server serves
now. Contexts are cached per trust-anchor file: loading the system store costs ~80 ms, which
would eat a third of the rollback budget.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509

from certd import fs as fsutil
from certd.core.clock import Clock, isoformat
from certd.config import VerifyEndpoint
from certd.core.errors import VerificationFailed
from certd.core.model import CertInfo

log = logging.getLogger("certd.verify")  # a stable name: it is part of the log format

#: Pause between rounds of handshakes while waiting for a server to switch.
POLL_INTERVAL = 0.02
#: Upper bound for one handshake inside :func:`await_served` (the deadline also caps it).
PROBE_TIMEOUT = 3.0

# OpenSSL X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_ERRORS = (62, 64)


@dataclass(frozen=True)
class Served:
    """One handshake's outcome. ``info`` is None when no certificate was received."""

    endpoint: VerifyEndpoint
    info: CertInfo | None
    chain_valid: bool
    name_valid: bool
    error: str | None  # why the chain or name is not valid, or why no handshake happened

    @property
    def ok(self) -> bool:
        return self.info is not None and self.chain_valid and self.name_valid


def probe(endpoint: VerifyEndpoint, *, timeout: float = 3.0) -> Served:
    """Handshake once with ``endpoint`` (SNI ``endpoint.sni``) and report what it served."""
    try:
        verifying = _context(endpoint.ca_bundle, check_name=True)
    except OSError as e:
        return _diagnose(endpoint, timeout, None,
                         f"cannot load trust anchors {endpoint.ca_bundle}: {e.strerror or e}")
    try:
        der = _handshake(endpoint, verifying, timeout)
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in _NAME_ERRORS:
            return _diagnose(endpoint, timeout, False, None)
        return _diagnose(endpoint, timeout, None, _chain_error(endpoint, e))
    except OSError as e:  # includes ssl.SSLError and TimeoutError
        return Served(endpoint, None, False, False, _connect_error(e, timeout))
    return Served(endpoint, _info(der), True, True, None)


def await_served(endpoints: Sequence[VerifyEndpoint], expected_fingerprint: str, *,
                 timeout: float, clock: Clock) -> list[Served]:
    """Handshake all ``endpoints`` every :data:`POLL_INTERVAL` until, in one round, every one
    serves the leaf with SHA-256 ``expected_fingerprint`` with a valid chain and name.

    Returns that round's results; raises :class:`VerificationFailed` naming, per endpoint, what
    was served instead once ``timeout`` seconds (on ``clock``) have passed.
    """
    expected = expected_fingerprint.lower().replace(":", "")
    start = clock.monotonic()
    deadline = start + timeout
    rounds = 0
    while True:
        rounds += 1
        served = [probe(ep, timeout=max(0.05, min(PROBE_TIMEOUT, deadline - clock.monotonic())))
                  for ep in endpoints]
        problems = [p for p in (describe_problem(s, expected) for s in served) if p]
        elapsed = clock.monotonic() - start
        if not problems:
            log.info("cert_served fingerprint=%s endpoints=%d elapsed=%.3fs rounds=%d",
                     expected, len(served), elapsed, rounds,
                     extra={"event": "cert_served", "fingerprint": expected, "elapsed": elapsed})
            return served
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            message = "; ".join(problems)
            log.warning("verify_failed elapsed=%.3fs rounds=%d %s", elapsed, rounds, message,
                        extra={"event": "verify_failed", "fingerprint": expected, "elapsed": elapsed})
            raise VerificationFailed(message)
        clock.sleep(min(POLL_INTERVAL, remaining))


def describe_problem(served: Served, expected_fingerprint: str) -> str | None:
    """One line saying how ``served`` differs from "the expected leaf, valid"; None if it doesn't."""
    ep = served.endpoint
    if served.info is None:
        return f"{ep}: {served.error or 'no certificate received'}"
    if served.info.fingerprint_sha256 != expected_fingerprint:
        extra = f"; {served.error}" if served.error else ""
        return (f"{ep}: served serial {served.info.serial} (not after "
                f"{isoformat(served.info.not_after)}, fingerprint {served.info.fingerprint_sha256}), "
                f"expected fingerprint {expected_fingerprint}{extra}")
    if not (served.chain_valid and served.name_valid):
        return f"{ep}: {served.error or 'certificate not valid'}"
    return None


# --- handshakes -----------------------------------------------------------------------------


def _handshake(endpoint: VerifyEndpoint, ctx: ssl.SSLContext, timeout: float) -> bytes:
    """Connect, handshake with SNI, return the served leaf's DER."""
    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=endpoint.sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server sent no certificate")
    return der


def _diagnose(endpoint: VerifyEndpoint, timeout: float, name_valid: bool | None,
              chain_error: str | None) -> Served:
    """After a failed verified handshake: learn the chain verdict (if unknown) and the leaf.

    ``name_valid`` None = not known yet (compute from the leaf); ``chain_error`` None = the
    chain was not judged yet (check it without the name).
    """
    der: bytes | None = None
    if chain_error is None:
        try:
            der = _handshake(endpoint, _context(endpoint.ca_bundle, check_name=False), timeout)
        except ssl.SSLCertVerificationError as e:
            chain_error = _chain_error(endpoint, e)
        except OSError as e:
            return Served(endpoint, None, False, False, _connect_error(e, timeout))
    if der is None:
        try:
            der = _handshake(endpoint, _unverified_context(), timeout)
        except OSError as e:
            reason = chain_error or f"name {endpoint.sni} does not match"
            return Served(endpoint, None, False, False, f"{reason}; then {_connect_error(e, timeout)}")
    cert = x509.load_der_x509_certificate(der)
    info = CertInfo.from_cert(cert)
    if name_valid is None:
        name_valid = name_matches(cert, endpoint.sni)
    errors = [chain_error] if chain_error else []
    if not name_valid:
        names = ", ".join(_san_names(cert)) or "none"
        errors.append(f"name {endpoint.sni} does not match the certificate (names: {names})")
    return Served(endpoint, info, chain_error is None, name_valid, "; ".join(errors) or None)


def _chain_error(endpoint: VerifyEndpoint, e: ssl.SSLCertVerificationError) -> str:
    anchors = str(endpoint.ca_bundle) if endpoint.ca_bundle else "the system trust store"
    return f"chain does not validate against {anchors}: {e.verify_message or e.reason or e}"


def _connect_error(e: OSError, timeout: float) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return f"no TLS handshake within {timeout:g}s"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {e.reason or e}"
    return f"cannot connect: {e.strerror or e}"


def _info(der: bytes) -> CertInfo:
    return CertInfo.from_cert(x509.load_der_x509_certificate(der))


# --- contexts -------------------------------------------------------------------------------


def _context(ca_bundle: Path | None, *, check_name: bool) -> ssl.SSLContext:
    """A verifying client context, cached until the trust-anchor file changes."""
    stamp = fsutil.identity(ca_bundle) if ca_bundle is not None else None
    return _cached_context(str(ca_bundle) if ca_bundle else None, stamp, check_name)


@lru_cache(maxsize=64)
def _cached_context(ca_bundle: str | None, stamp: object, check_name: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    ctx.check_hostname = check_name
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@lru_cache(maxsize=1)
def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- names ----------------------------------------------------------------------------------


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def name_matches(cert: x509.Certificate, name: str) -> bool:
    """RFC 6125 matching of ``name`` against the SANs (no CN fallback, as browsers do): exact,
    case-insensitive, or a ``*.`` wildcard standing for exactly one left-most label."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    host = name.lower().rstrip(".")
    for pattern in (p.lower().rstrip(".") for p in san.get_values_for_type(x509.DNSName)):
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            label, rest = host.split(".", 1)
            if label and rest == pattern[2:]:
                return True
    return False
