"""The HTTP side of ACME: a faster, sturdier ``ClientNetwork``, and the error mapping.

``acme.client.ClientNetwork`` signs requests and keeps nonces; certd keeps that and changes
three things:

- **Transport.** ``requests`` costs ~1.5 ms of CPU per request here (proxy environment scans,
  runtime ``Protocol`` checks in requests 2.34, cookie handling); an order is 7 requests and
  certd aims at ~85 orders/s on two cores. :class:`LeanSession` speaks HTTP/1.1 keep-alive
  over ``http.client`` (~0.4 ms) and hands back real ``requests.Response`` objects, so the
  library code is unchanged. When a proxy is configured in the environment for the CA's
  host, plain ``requests`` is used instead, so proxies keep working.
- **badNonce.** The library retries once and drops the fresh nonce the error carried; at
  PEBBLE_WFE_NONCEREJECT=50 that fails one request in four. :class:`AcmeNetwork` keeps every
  nonce the server sends (RFC 8555 §6.5) and retries until the order's deadline (outside an
  order: up to :data:`BAD_NONCE_ATTEMPTS` times).
- **409.** The library turns every 409 into a bare ``ConflictError``; with a problem document
  (RFC 9773 ``alreadyReplaced``) the problem is kept.

:class:`Failure` turns whatever the transport or the CA threw into one certd error: the CA is
not reachable (:class:`~certd.core.errors.CANotReachable`) or the CA said no
(:class:`~certd.core.errors.AcmeError` carrying the RFC 8555 problem type).
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import select
import socket
import ssl
import time
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Callable
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from requests.structures import CaseInsensitiveDict

from certd.core.clock import Clock, utc
from certd.core.errors import AcmeError, CANotReachable, ConfigError

log = logging.getLogger("certd.acmenet")  # a stable name: it is part of the log format

# At 50 % rejected nonces, 12 tries all failed with p = 1/4096 per request: ~0.25 % of orders
# (8-10 POSTs each) failed on badNonce alone. 24 tries: p = 6e-8 per request; each retry is one
# round trip, and a CA rejecting every nonce (a broken proxy) still fails within seconds.
BAD_NONCE_ATTEMPTS = 24
MAX_RESPONSE_BYTES = 4 << 20  # ACME answers are a few KiB; a certificate chain well under 1 MiB
PROBLEM_PREFIX = "urn:ietf:params:acme:error:"
TRANSIENT_PROBLEMS = {"rateLimited", "serverInternal", "badNonce", "orderNotReady"}
NEXT_STEP = {
    "unauthorized": "the CA does not allow this account to do that",
    "rejectedIdentifier": "the CA will not issue for these names; change the domains",
    "unsupportedIdentifier": "the CA will not issue for these names; change the domains",
    "caa": "a CAA record forbids this CA; fix the CAA records",
    "badCSR": "the CA refuses the request (key type or names); change key_type or domains",
    "badPublicKey": "the CA refuses this key; change key_type",
    "externalAccountRequired": "set eab_kid and eab_hmac_key in [acme]",
    "invalidContact": "fix [acme] email",
    "unsupportedContact": "fix [acme] email",
}


# --- transport ---------------------------------------------------------------------------------


class LeanSession:
    """The part of ``requests.Session`` that ``ClientNetwork`` uses, over ``http.client``.

    One keep-alive connection per origin; not thread-safe (certd uses one per thread).
    Failures raise the ``requests`` exceptions the rest of certd maps. Unlike ``requests``,
    ``timeout`` bounds the whole answer, not each read (a server trickling bytes cannot hold a
    request open), and an answer over :data:`MAX_RESPONSE_BYTES` is refused unread
    (:class:`ResponseTooLarge`) instead of filling memory.
    """

    def __init__(self) -> None:
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        self._contexts: dict[bool | str, ssl.SSLContext] = {}

    def request(self, method: str, url: str, data: Any = None, headers: dict[str, str] | None = None,
                verify: bool | str = True, timeout: float | None = None, **_: Any) -> requests.Response:
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        body = data.encode() if isinstance(data, str) else data
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in (1, 2):
            conn, reused = self._connection(origin, verify, timeout)
            conn.response_class = functools.partial(_BoundedResponse, deadline=deadline)  # type: ignore[assignment]
            try:
                conn.request(method, target, body=body, headers=headers or {})
                raw = conn.getresponse()
                content = _read_bounded(raw, method, url)
            except ResponseTooLarge:
                self._drop(origin)
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self._drop(origin)
                if reused and attempt == 1:
                    continue  # the server closed an idle keep-alive connection: once more on a new one
                raise requests.exceptions.ConnectionError(f"{type(e).__name__}: {e}") from None
            except ssl.SSLError as e:
                self._drop(origin)
                raise requests.exceptions.SSLError(str(e)) from None
            except TimeoutError as e:
                self._drop(origin)
                raise requests.exceptions.Timeout(f"timed out: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(origin)
                raise requests.exceptions.ConnectionError(f"{type(e).__name__}: {e}") from None
            if raw.will_close:
                self._drop(origin)
            return _response(url, raw, content)
        raise AssertionError("unreachable")

    def _connection(self, origin: tuple[str, str, int], verify: bool | str,
                    timeout: float | None) -> tuple[http.client.HTTPConnection, bool]:
        conn = self._conns.get(origin)
        if conn is not None and conn.sock is not None and _closed_by_peer(conn.sock):
            self._drop(origin)
            conn = None
        if conn is not None:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context(verify))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._conns[origin] = conn
        return conn, False

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        ctx = self._contexts.get(verify)
        if ctx is None:
            if verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            self._contexts[verify] = ctx
        return ctx

    def _drop(self, origin: tuple[str, str, int]) -> None:
        conn = self._conns.pop(origin, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for origin in list(self._conns):
            self._drop(origin)

    # ClientNetwork.__init__ mounts adapters on its session; nothing to mount here.
    def mount(self, prefix: str, adapter: Any) -> None:
        pass


class ResponseTooLarge(requests.exceptions.RequestException):
    """The server's answer is larger than :data:`MAX_RESPONSE_BYTES`; it was not read."""


class _DeadlineReader(io.RawIOBase):
    """The socket's file, with every read ending by ``deadline`` (``time.monotonic()``).

    A socket timeout bounds each ``recv`` alone: a server that sends one byte every few
    seconds would keep a request alive for ever. Here every read gets only the time left.
    """

    def __init__(self, raw: Any, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer before the request's deadline")
        self._sock.settimeout(left)
        return int(self._raw.readinto(buffer))

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket file keeps the socket open until the answer is read
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` (status, headers, body) that must arrive whole before ``deadline``."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: float | None = None, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        if deadline is not None:
            self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


def _read_bounded(raw: http.client.HTTPResponse, method: str, url: str) -> bytes:
    """The body, or :class:`ResponseTooLarge` before more than the limit is read."""
    too_large = ResponseTooLarge(f"the answer to {method} {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    if raw.length is not None and raw.length > MAX_RESPONSE_BYTES:
        raise too_large
    content = raw.read(MAX_RESPONSE_BYTES + 1)
    if len(content) > MAX_RESPONSE_BYTES:
        raise too_large
    return content


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or spoke out of turn)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _response(url: str, raw: http.client.HTTPResponse, content: bytes) -> requests.Response:
    response = requests.Response()
    response.status_code = raw.status
    response.reason = raw.reason
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for name, value in raw.getheaders():
        # repeated fields (Link) are joined as requests/urllib3 join them
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    response.headers = headers
    response._content = content
    response.url = url
    response.encoding = "utf-8"
    return response


def proxied(url: str) -> bool:
    """True when the environment configures a proxy for ``url``."""
    return bool(requests.utils.get_environ_proxies(url))


def url_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit; ValueError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def check_origin(url: str, directory_url: str) -> None:
    """Refuse a URL the CA handed out (order, authorization, challenge, finalize, certificate,
    renewalInfo, a Location) unless it has the directory's scheme, host and port: a CA, or
    whoever speaks for it, must not send certd to another server (a local service, an
    ``http://`` URL where the account's requests would cross the network in clear text).
    ``http://`` is allowed only for a loopback directory (a test CA such as Pebble)."""
    from certd.config.values import is_loopback
    try:
        want = url_origin(directory_url)
        got = url_origin(url)
    except ValueError as e:
        raise AcmeError(f"the CA handed out a URL certd will not fetch ({e}); not retrying") from None
    if want[0] == "http" and not is_loopback(want[1]):
        raise AcmeError(f"ACME directory {directory_url} is plain http:// on a non-loopback host; use https://; "
                        "not retrying")
    if got != want:
        raise AcmeError(f"the CA handed out {one_line(url)[:200]}, outside its directory's origin "
                        f"{want[0]}://{want[1]}:{want[2]}; not fetched (a misconfigured or compromised CA?); "
                        "not retrying")


class AcmeNetwork(acme_client.ClientNetwork):
    """``ClientNetwork`` on a :class:`LeanSession` (unless proxied), with badNonce retries."""

    def __init__(self, key: jose.JWK | None, *, alg: jose.JWASignature, verify_ssl: bool | str,
                 user_agent: str, timeout: int, lean: bool = True,
                 on_request: Callable[[float], None] | None = None, clock: Clock | None = None) -> None:
        # verify_ssl: a CA bundle's path too (requests takes either); acme annotates it bool.
        super().__init__(key, alg=alg, verify_ssl=verify_ssl,  # type: ignore[arg-type]
                         user_agent=user_agent, timeout=timeout)
        # Told the duration of every HTTP request (answered or not), for the metrics.
        self._on_request, self._clock = on_request, clock
        if lean:
            self.session.close()
            self.session = LeanSession()  # type: ignore[assignment]

    #: Seconds left until the caller's deadline (an order's), or None; set per order by the issuer.
    time_left: Callable[[], float] | None = None

    #: The ACME directory's URL: every URL fetched must share its origin (check_origin). Set by the issuer.
    directory_url: str | None = None

    def _timeout_now(self, asked: float | None) -> float:
        """The whole-request timeout: the network timeout, but never past the caller's deadline."""
        timeout = float(asked if asked is not None else self._default_timeout)
        if self.time_left is not None:
            timeout = min(timeout, max(0.001, self.time_left()))
        return timeout

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        """POST, retrying badNonce with the fresh nonce each rejection carries: inside an order
        (``time_left`` set) until its deadline, whatever the count — a CA rejecting 90 % of
        nonces needs ~10 tries a request and ~640 an order — else :data:`BAD_NONCE_ATTEMPTS`."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as e:
                if e.code != "badNonce":
                    raise
                if self.time_left is not None:
                    if self.time_left() <= 0:
                        raise
                elif attempt >= BAD_NONCE_ATTEMPTS:
                    raise
                log.debug("badNonce (attempt %d); retrying with a fresh nonce", attempt)

    def _wrap_in_jws(self, obj: jose.JSONDeSerializable | None, nonce: bytes,  # type: ignore[override]
                     url: str) -> str:
        """RFC 8555 §6.2 flattened JWS, built directly: josepy's object model costs ~1 ms a request.

        Same result as the library's: protected header {alg, nonce, url, kid | jwk}, compact JSON.
        """
        assert self.key is not None
        payload = obj.json_dumps().encode() if obj else b""
        header: dict[str, Any] = {"alg": self.alg.name, "nonce": jose.b64encode(nonce).decode(), "url": url}
        if self.account is not None:
            header["kid"] = self.account["uri"]
        else:  # newAccount (and revocation by certificate key) carry the public key instead
            header["jwk"] = self.key.public_key().to_partial_json()
        protected = jose.b64encode(json.dumps(header, separators=(",", ":")).encode()).decode()
        encoded_payload = jose.b64encode(payload).decode()
        signature = self.alg.sign(self.key.key, f"{protected}.{encoded_payload}".encode())
        return json.dumps({"protected": protected, "payload": encoded_payload,
                           "signature": jose.b64encode(signature).decode()})

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        # The library's version formats every header for a debug line even when nobody logs it.
        if self.directory_url is not None:
            check_origin(url, self.directory_url)
        kwargs["verify"] = self.verify_ssl
        headers = kwargs.setdefault("headers", {})
        headers.setdefault("User-Agent", self.user_agent)
        kwargs["timeout"] = self._timeout_now(kwargs.get("timeout"))
        if self._on_request is None or self._clock is None:
            response = self.session.request(method, url, *args, **kwargs)
        else:
            started = self._clock.monotonic()
            try:
                response = self.session.request(method, url, *args, **kwargs)
            finally:
                self._on_request(self._clock.monotonic() - started)
        if "Accept" not in headers:
            response.encoding = "utf-8"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> HTTP %d", method, url, response.status_code)
        if not response.ok and self.REPLAY_NONCE_HEADER in response.headers:
            # Errors carry a fresh nonce too; the library drops it and asks newNonce again.
            try:
                self._add_nonce(response)
            except acme_errors.BadNonce:
                pass
        return response

    @classmethod
    def _check_response(cls, response: requests.Response,
                        content_type: str | None = None) -> requests.Response:
        if response.status_code == 409:
            try:
                problem = messages.Error.from_json(response.json())
            except (ValueError, jose.DeserializationError):
                problem = None
            if problem is not None and problem.typ != "about:blank":
                problem.retry_after = response.headers.get("Retry-After")
                raise problem
        try:
            return super()._check_response(response, content_type=content_type)
        except messages.Error as e:
            e.retry_after = response.headers.get("Retry-After")  # for rateLimited
            raise


# --- errors ----------------------------------------------------------------------------------


class Failure:
    """Turns what the transport or the CA threw into a certd error (one line, next step)."""

    def __init__(self, directory_url: str, clock: Clock) -> None:
        self.directory_url = directory_url
        self.clock = clock

    def __call__(self, e: BaseException, doing: str) -> Exception:
        if isinstance(e, (AcmeError, ConfigError)):
            return e
        if isinstance(e, ResponseTooLarge):
            return AcmeError(f"{doing}: {e}; not read (a broken CA or proxy?); will retry", transient=True)
        if isinstance(e, requests.exceptions.SSLError):
            return self.unreachable(f"TLS error: {_tls_reason(e)}")
        if isinstance(e, requests.exceptions.Timeout):
            return self.unreachable("timed out")
        if isinstance(e, requests.exceptions.ConnectionError):
            return self.unreachable(_connection_reason(e))
        if isinstance(e, messages.Error):
            return self.problem(e, doing)
        if isinstance(e, acme_errors.ClientError):
            status = _status_of(e)
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
            next_step = "will retry" if transient else NEXT_STEP.get(code, "see the CA's documentation of this problem")
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


def retry_after_seconds(header: str | None, now: datetime) -> float | None:
    """Seconds from ``now`` that a Retry-After header (seconds or HTTP-date) asks for."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        return max(0.0, (utc(parsedate_to_datetime(header)) - now).total_seconds())
    except (TypeError, ValueError, IndexError):
        return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _status_of(e: acme_errors.ClientError) -> int | None:
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


def _tls_reason(e: BaseException) -> str:
    text = str(e)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "its certificate is not trusted; set [acme] ca_bundle"
    if "hostname mismatch" in text or "doesn't match" in text:
        return "its certificate does not match the host name"
    return "handshake failed"
