"""From whatever the transport or the CA threw to one certd error.

:class:`Failure` maps: the CA is not reachable (:class:`~certd.core.errors.CANotReachable`:
refused, timed out, TLS, DNS) or the CA said no (:class:`~certd.core.errors.AcmeError`
carrying the RFC 8555 problem type, transience, the next step, and a rateLimited problem's
Retry-After). Messages are one line ending with what happens next.
"""

from __future__ import annotations

from datetime import timedelta

import josepy as jose
import requests
from acme import errors as acme_errors
from acme import messages

from certd.acme.http import ResponseTooLarge
from certd.core.clock import Clock
from certd.core.errors import AcmeError, CANotReachable, ConfigError
from certd.core.retry_after import retry_after_seconds

PROBLEM_PREFIX = "urn:ietf:params:acme:error:"
TRANSIENT_PROBLEMS = {"rateLimited", "serverInternal", "badNonce", "orderNotReady"}
NEXT_STEP = {
    "unauthorized": "the CA does not allow this account to do that",
    "rejectedIdentifier": "the CA will not issue for these names; change the domains",
    "unsupportedIdentifier": "the CA will not issue for these names; change the domains",
    "caa": "a CAA record forbids this CA; fix the CAA records",
    "badCSR": "the CA refuses the request (key type or names); change key_type or domains",
    "badPublicKey": "the CA refuses this key; change key_type",
    "externalAccountRequired": "set eab_kid and eab_hmac_key in {table}",
    "invalidContact": "fix {table} email",
    "unsupportedContact": "fix {table} email",
}


class Failure:
    """Turns what the transport or the CA threw into a certd error (one line, next step)."""

    def __init__(self, directory_url: str, clock: Clock, table: str = "[acme]") -> None:
        self.directory_url = directory_url
        self.clock = clock
        self.table = table  # where that CA's keys are, for the next step: [acme] or [[ca]] "name"

    def __call__(self, e: BaseException, doing: str) -> Exception:
        if isinstance(e, (AcmeError, ConfigError)):
            return e
        if isinstance(e, ResponseTooLarge):
            return AcmeError(f"{doing}: {e}; not read (a broken CA or proxy?); will retry", transient=True)
        if isinstance(e, requests.exceptions.SSLError):
            return self.unreachable(f"TLS error: {_tls_reason(e, self.table)}")
        if isinstance(e, requests.exceptions.Timeout):
            return self.unreachable("timed out")
        if isinstance(e, requests.exceptions.ConnectionError):
            return self.unreachable(_connection_reason(e))
        if isinstance(e, messages.Error):
            return self.problem(e, doing)
        if isinstance(e, acme_errors.ClientError):
            status = http_status(e)
            transient = status is None or status >= 500
            return AcmeError(f"{doing}: the CA answered HTTP {status or '?'} without a problem document; "
                             f"{'will retry' if transient else 'a broken CA or proxy?'}", transient=transient)
        if isinstance(e, requests.exceptions.RequestException):
            return self.unreachable(one_line(str(e)) or type(e).__name__)
        if isinstance(e, (ValueError, jose.DeserializationError, KeyError)):
            return AcmeError(f"{doing}: the CA sent an answer certd cannot read ({one_line(str(e))[:120]}); "
                             "will retry", transient=True)
        return AcmeError(f"{doing}: {type(e).__name__}: {one_line(str(e))[:200]}; will retry", transient=True)

    def unreachable(self, why: str) -> CANotReachable:
        return CANotReachable(f"ACME server {self.directory_url} is not reachable ({why}); will retry")

    def problem(self, e: messages.Error, doing: str) -> AcmeError:
        code = problem_code(e)
        retry_after = retry_after_seconds(getattr(e, "retry_after", None), self.clock.now())
        transient = code in TRANSIENT_PROBLEMS
        if code == "rateLimited":
            when = (self.clock.now() + timedelta(seconds=retry_after)).strftime("%H:%M UTC") \
                if retry_after is not None else None
            next_step = f"will retry after {when}" if when else "will retry later"
        else:
            fix = NEXT_STEP.get(code, "see the CA's documentation of this problem")
            next_step = "will retry" if transient else fix.format(table=self.table)
        return AcmeError(f"{doing}: the CA refused ({code}): {problem_detail(e)}; {next_step}",
                         problem_type=e.typ, detail=e.detail, transient=transient, retry_after=retry_after,
                         where=getattr(e, "certd_where", None))


def problem_code(e: messages.Error) -> str:
    """``rateLimited`` for ``urn:ietf:params:acme:error:rateLimited``; the whole type otherwise."""
    typ = str(e.typ or "about:blank")
    return typ[len(PROBLEM_PREFIX):] if typ.startswith(PROBLEM_PREFIX) else typ


def problem_detail(e: messages.Error) -> str:
    """The problem's detail on one line, with the first subproblem (RFC 8555 §6.7.1)."""
    text = one_line(e.detail or e.title or e.description or "no detail")
    subs = list(e.subproblems or ())
    if subs:
        first = subs[0]
        who = f"{first.identifier.value}: " if first.identifier else ""
        text += f" [{who}{problem_code(first)}: {one_line(first.detail or '')}" \
                f"{f'; {len(subs) - 1} more' if len(subs) > 1 else ''}]"
    return text[:400]


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def http_status(e: acme_errors.ClientError) -> int | None:
    """The HTTP status of a CA answer without a problem document (None if unknown)."""
    for arg in e.args:
        for candidate in (arg if isinstance(arg, tuple) else (arg,)):
            if isinstance(candidate, requests.Response):
                return candidate.status_code
    return None


def _connection_reason(e: BaseException) -> str:
    text = str(e)
    for needle, why in (("Connection refused", "connection refused"),
                        ("Name or service not known", "its name does not resolve"),
                        ("Temporary failure in name resolution", "its name does not resolve"),
                        ("No route to host", "no route to host"),
                        ("Network is unreachable", "network unreachable"),
                        ("timed out", "timed out"),
                        ("Connection reset", "connection reset"),
                        ("RemoteDisconnected", "the server closed the connection")):
        if needle in text:
            return why
    return "connection failed"


def _tls_reason(e: BaseException, table: str = "[acme]") -> str:
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"its certificate is not trusted; set {table} ca_bundle"
    if "hostname mismatch" in text or "doesn't match" in text:
        return "its certificate does not match the host name"
    return "handshake failed"
