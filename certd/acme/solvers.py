"""Challenge solvers: make the CA's validation request succeed, then tidy up.

A :class:`Solver` gets ``present()`` before certd tells the CA to validate an authorization and
``cleanup()`` once the authorization is decided (valid or not). ``domain`` is the
authorization's identifier, so ``*.example.com`` arrives as ``example.com``; a wildcard and its
apex in one order therefore present two different values for the same name, which every
solver here supports.

- http-01 standalone: a built-in responder per listen address, shared by every certificate and
  thread that needs it and refcounted (started on the first ``present``, stopped after the last
  ``cleanup``). Its accept loop is woken through a pipe, so stopping takes microseconds, not a
  poll interval: certd may start and stop it once per certificate.
- http-01 webroot: files under ``<webroot>/.well-known/acme-challenge/`` for a web server the
  operator already runs.
- dns-01: an operator-supplied hook, ``hook... set|clear <domain> <TXT value>``.
- tls-alpn-01 (RFC 8737): a built-in TLS responder answering ALPN ``acme-tls/1`` with a
  self-signed certificate carrying the critical acmeIdentifier extension.
- dns-persist-01: one persistent TXT record (certd.acme.persist), published by an optional
  hook, ``hook... persist <domain> <TXT value>``, once per process.

Setup failures raise :class:`~certd.core.errors.ChallengeFailed` (transient: the port may be free
and the hook fixed next time); cleanup failures are logged, never raised, so they cannot hide
the outcome of the order.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import josepy as jose
from acme import challenges

from certd.acme import answers, persist
from certd.acme.responders import (
    _LISTENERS,
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    CHALLENGE_PATH,
    TLSALPN01,
    StandaloneHttpSolver,
    TlsAlpnSolver,
)
from certd.config import CertificateConfig
from certd.core import capabilities
from certd.core.errors import ChallengeFailed
from certd.reload.command import find_program

__all__ = ["ACME_IDENTIFIER_OID", "ACME_TLS_ALPN", "CHALLENGE_PATH", "TLSALPN01", "_LISTENERS", "DnsHookSolver",
           "DnsPersistSolver",
           "Solver", "StandaloneHttpSolver", "TlsAlpnSolver", "WebrootSolver", "solver_for"]

log = logging.getLogger("certd.solvers")  # a stable name: it is part of the log format

HOOK_TIMEOUT = 60.0
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class Solver(Protocol):
    """Answers one challenge type for one certificate's configuration."""

    challenge_type: str

    def present(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        """Make the validation for ``challenge`` reachable; raise ChallengeFailed if impossible."""

    def cleanup(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        """Undo ``present``; never raises."""


def solver_for(cert: CertificateConfig) -> Solver:
    """The solver ``cert``'s configuration asks for (certd/config/schema.py has checked it is complete)."""
    if cert.challenge == "http-01":
        if cert.http01_webroot is not None:
            return WebrootSolver(cert.http01_webroot)
        assert cert.http01_listen is not None
        return StandaloneHttpSolver(cert.http01_listen)
    if cert.challenge == "dns-01":
        return DnsHookSolver(cert.dns01_hook)
    if cert.challenge == "tls-alpn-01":
        assert cert.tlsalpn01_listen is not None
        return TlsAlpnSolver(cert.tlsalpn01_listen)
    if cert.challenge == "dns-persist-01":
        return DnsPersistSolver(cert.dns_persist_hook, cert.domains)
    raise ValueError(f"unknown challenge type {cert.challenge!r}")


# --- http-01 webroot -------------------------------------------------------------------


class WebrootSolver:
    """http-01 through files under ``<webroot>/.well-known/acme-challenge/``."""

    challenge_type = "http-01"

    def __init__(self, webroot: Path) -> None:
        self.webroot = Path(webroot)

    def _path(self, challenge: challenges.KeyAuthorizationChallenge) -> Path:
        token = challenge.encode("token")
        # acme's ``good_token`` looks at the *decoded* bytes and refuses ~12 % of random tokens;
        # what matters is the encoded name: base64url only, so no "/" and no "..".
        if not _TOKEN_RE.match(token):
            raise ChallengeFailed(f"the CA sent an unusable http-01 token {token[:40]!r}; will retry",
                                  transient=True)
        return self.webroot / ".well-known" / "acme-challenge" / token

    def present(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        path = self._path(challenge)
        answers.publish(domain, challenge.encode("token"), challenge.validation(account_key))
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".certd-")
            try:
                os.fchmod(fd, 0o644)  # the web server must read it
                os.write(fd, challenge.validation(account_key).encode("ascii"))
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            raise ChallengeFailed(f"http-01 webroot: cannot write {path}: {e.strerror}; "
                                  f"check that certd may write under {self.webroot}; will retry",
                                  transient=True) from None

    def cleanup(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        answers.withdraw(challenge.encode("token"))
        try:
            self._path(challenge).unlink(missing_ok=True)
        except (OSError, ChallengeFailed) as e:
            log.warning("http-01 webroot: cannot remove challenge file for %s: %s", domain, e)


# --- dns-01 ----------------------------------------------------------------------------------


class DnsHookSolver:
    """dns-01 through ``hook... set|clear <domain> <TXT value>`` (argv, no shell)."""

    challenge_type = "dns-01"

    def __init__(self, hook: tuple[str, ...] | list[str], timeout: float = HOOK_TIMEOUT) -> None:
        if not hook:
            raise ValueError("dns-01 needs a hook command")
        self.hook = tuple(hook)
        self.timeout = timeout

    def present(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        problem = self._run("set", domain, challenge.validation(account_key))
        if problem:
            raise ChallengeFailed(f"dns-01 hook {problem}; will retry", transient=True)

    def cleanup(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        problem = self._run("clear", domain, challenge.validation(account_key))
        if problem:
            log.warning("dns-01 hook %s; the TXT record may be left behind", problem)

    def _run(self, action: str, domain: str, value: str) -> str | None:
        """Run the hook; a one-line problem description, or None when it succeeded."""
        argv = [*self.hook, action, domain, value]
        what = f"{self.hook[0]} {action} {domain}"
        try:
            find_program(argv[0], os.environ)
            # The timeout is real time, handed to the kernel (waitpid): the hook is a real process.
            done = subprocess.run(capabilities.limited(argv), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"{what} did not finish within {self.timeout:g} s"
        except OSError as e:
            return f"{what} could not be started: {e.strerror}"
        out = _one_line(done.stdout) or ""
        err = _one_line(done.stderr) or ""
        log.info("dns-01 hook %s exited %d%s%s", what, done.returncode,
                 f"; stdout: {out}" if out else "", f"; stderr: {err}" if err else "")
        if done.returncode != 0:
            return f"{what} exited {done.returncode}" + (f": {err or out}" if err or out else "")
        return None


def _one_line(data: bytes, limit: int = 300) -> str | None:
    text = " | ".join(line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip())
    return text[:limit] + ("…" if len(text) > limit else "") if text else None


# --- dns-persist-01 -----------------------------------------------------------------------

#: (name, value) -> when this process's hook last published it. Asked again after an hour, so a
#: record removed by hand (or by another tool) comes back without a restart.
_published: dict[tuple[str, str], float] = {}
_published_lock = threading.Lock()
REPUBLISH_AFTER = 3600.0


class DnsPersistSolver:
    """Makes sure the persistent record exists (through the hook, once per process) and answers
    the challenge with ``{}``. :meth:`bind` gives it the account URL before the first present."""

    challenge_type = persist.CHALLENGE

    def __init__(self, hook: Sequence[str], domains: Sequence[str]) -> None:
        self.hook = DnsHookSolver(tuple(hook)) if hook else None
        self.wildcards = {d[2:] for d in domains if d.startswith("*.")}
        self.account_uri: str | None = None

    def bind(self, account_uri: str) -> None:
        self.account_uri = account_uri

    def present(self, domain: str, challenge: Any, account_key: jose.JWK) -> None:
        issuers = challenge.jobj.get("issuer-domain-names") if hasattr(challenge, "jobj") else None
        if not isinstance(issuers, list) or not issuers or not isinstance(issuers[0], str):
            raise ChallengeFailed(f"dns-persist-01 for {domain}: the CA's challenge names no issuer-domain-names; "
                                  f"will retry", transient=True)
        if self.account_uri is None:
            raise ChallengeFailed(f"dns-persist-01 for {domain}: no account URL yet; will retry", transient=True)
        value = persist.record_value(issuers[0], self.account_uri, domain in self.wildcards)
        if self.hook is None:
            return  # published by hand (certd dns-persist-record)
        with _published_lock:
            at = _published.get((domain, value))
            if at is not None and time.monotonic() - at < REPUBLISH_AFTER:
                return
        problem = self.hook._run("persist", domain, value)
        if problem:
            raise ChallengeFailed(f"dns-persist-01 hook {problem}; will retry", transient=True)
        with _published_lock:
            _published[(domain, value)] = time.monotonic()
        log.info("dns-persist-01 record published for %s", domain)

    def cleanup(self, domain: str, challenge: Any, account_key: jose.JWK) -> None:
        """Nothing: the record stays for the next order (that is the point of it)."""

    def response(self, challenge: Any, account_key: jose.JWK) -> persist.EmptyResponse:
        return persist.EmptyResponse()
