"""A TLS client that keeps asking servers what they serve, and judges every answer.

Used by the fault-injection tests and the soak (bench/soak.py). One look (:func:`probe_once`)
is a full handshake with SNI, verifying the chain against the trust anchors (Pebble's roots),
the dates and the name; a completed TLS 1.3 handshake also proves the server holds the key
of the certificate it sent (CertificateVerify), so a cert/key mismatch shows up as a failed
handshake. Every answer falls in one category:

``ok`` · ``expired`` · ``untrusted`` (chain does not validate) · ``wrong_name`` ·
``handshake_failed`` (TLS error: e.g. cert and key do not match) · ``dropped`` (the server
closed the connection mid-handshake: it crashed) · ``unreachable`` (connection refused or
timed out). The last two mean the server is down, not that it serves a bad certificate.

:class:`Prober` runs :func:`probe_once` round-robin over targets in a thread until stopped and
counts the categories; ``bad`` holds the first answers that were neither ``ok`` nor allowed.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certd.core.model import CertInfo

BAD = ("expired", "untrusted", "wrong_name", "handshake_failed")
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_ERRORS = (62, 64)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    sni: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port} (SNI {self.sni})"


@dataclass(frozen=True)
class ProbeResult:
    target: Target
    category: str
    info: CertInfo | None     # the served leaf, when one was received
    detail: str
    at: float                 # time.time() of the answer

    @property
    def ok(self) -> bool:
        return self.category == "ok"


class TrustAnchors:
    """A verifying client context for a CA file, rebuilt when the file changes (Pebble's root
    is new after every Pebble start: tests append the new one)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: object = None
        self._ctx: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def context(self) -> ssl.SSLContext:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if self._ctx is None or stamp != self._stamp:
                ctx = ssl.create_default_context(cafile=str(self.path))
                ctx.check_hostname = True
                ctx.verify_mode = ssl.CERT_REQUIRED
                self._ctx, self._stamp = ctx, stamp
            return self._ctx


_UNVERIFIED = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE


def _handshake(target: Target, ctx: ssl.SSLContext, timeout: float) -> bytes:
    with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=target.sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("no certificate")
    return der


def probe_once(target: Target, anchors: TrustAnchors, timeout: float = 3.0) -> ProbeResult:
    """One verified handshake with ``target``; see the module docstring for the categories."""
    try:
        der = _handshake(target, anchors.context(), timeout)
    except ssl.SSLCertVerificationError as e:
        category = ("expired" if e.verify_code in (_EXPIRED, _NOT_YET_VALID) else
                    "wrong_name" if e.verify_code in _NAME_ERRORS else "untrusted")
        info = None
        try:
            info = CertInfo.from_cert(x509.load_der_x509_certificate(_handshake(target, _UNVERIFIED, timeout)))
        except (OSError, ValueError):
            pass
        return ProbeResult(target, category, info, f"{e.verify_message or e} (X509 error {e.verify_code})", time.time())
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as e:
        return ProbeResult(target, "dropped", None, str(e), time.time())
    except ssl.SSLError as e:
        if "UNEXPECTED_EOF" in str(e):
            return ProbeResult(target, "dropped", None, str(e), time.time())
        return ProbeResult(target, "handshake_failed", None, str(e), time.time())
    except OSError as e:
        return ProbeResult(target, "unreachable", None, f"{type(e).__name__}: {e}", time.time())
    return ProbeResult(target, "ok", CertInfo.from_cert(x509.load_der_x509_certificate(der)), "", time.time())


def verified_leaf(target: Target, anchors: TrustAnchors) -> CertInfo:
    """The leaf one verified handshake receives; fails the test unless the handshake is clean."""
    result = probe_once(target, anchors)
    assert result.ok and result.info is not None, (result.category, result.detail)
    return result.info


class Prober:
    """Probe ``targets`` round-robin in a background thread until :meth:`stop`.

    ``allow`` lists categories that are expected right now (e.g. ``{"unreachable"}`` while a
    test has nginx down); it can be changed while running. ``on_result`` sees every answer.
    """

    def __init__(self, targets: Sequence[Target], anchors: TrustAnchors | Path, *, interval: float = 0.02,
                 on_result: Callable[[ProbeResult], None] | None = None) -> None:
        self.targets = list(targets)
        self.anchors = anchors if isinstance(anchors, TrustAnchors) else TrustAnchors(anchors)
        self.interval = interval
        self.on_result = on_result
        self.allow: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.bad: list[ProbeResult] = []
        self.last: dict[Target, ProbeResult] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> Prober:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def unexpected(self) -> list[ProbeResult]:
        """Answers that were not ``ok`` and not allowed when they were seen."""
        with self._lock:
            return list(self.bad)

    def wait_for(self, predicate: Callable[[ProbeResult], bool], timeout: float) -> ProbeResult:
        """Poll until the latest answer of some target satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                hits = [r for r in self.last.values() if predicate(r)]
            if hits:
                return hits[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"no probe answer matched within {timeout:g}s; last: "
                                     f"{[(str(r.target), r.category, r.detail) for r in self.last.values()]}")
            time.sleep(0.02)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            target = self.targets[i % len(self.targets)]
            i += 1
            allowed = set(self.allow)   # as it was when the handshake started
            result = probe_once(target, self.anchors)
            with self._lock:
                self.counts[result.category] += 1
                self.last[target] = result
                if not result.ok and result.category not in allowed and len(self.bad) < 100:
                    self.bad.append(result)
            if self.on_result is not None:
                self.on_result(result)
            self._stop.wait(self.interval)
