"""HTTP for ACME without ``requests``' per-request cost: :class:`LeanSession`.

``requests`` costs ~1.5 ms of CPU per request here (proxy environment scans, runtime
``Protocol`` checks in requests 2.34, cookie handling); an order is 7 requests and certd aims
at ~85 orders/s on two cores. :class:`LeanSession` speaks HTTP/1.1 keep-alive over
``http.client`` (~0.4 ms) and hands back real ``requests.Response`` objects, so the ``acme``
library code above it is unchanged. When a proxy is configured in the environment for the
CA's host, plain ``requests`` is used instead (see :func:`proxied`), so proxies keep working.
"""

from __future__ import annotations

import functools
import http.client
import io
import select
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.structures import CaseInsensitiveDict

from certd.core.clock import Clock

MAX_RESPONSE_BYTES = 4 << 20  # ACME answers are a few KiB; a certificate chain well under 1 MiB


class LeanSession:
    """The part of ``requests.Session`` that ``ClientNetwork`` uses, over ``http.client``.

    One keep-alive connection per origin; not thread-safe (certd uses one per thread).
    Failures raise the ``requests`` exceptions the rest of certd maps. Unlike ``requests``,
    ``timeout`` bounds the whole answer, not each read (a server trickling bytes cannot hold a
    request open), and an answer over :data:`MAX_RESPONSE_BYTES` is refused unread
    (:class:`ResponseTooLarge`) instead of filling memory.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
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
        deadline = None if timeout is None else self._clock.monotonic() + timeout
        for attempt in (1, 2):
            conn, reused = self._connection(origin, verify, timeout)
            conn.response_class = functools.partial(  # type: ignore[assignment]
                _BoundedResponse, deadline=deadline, clock=self._clock)
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
    """The socket's file, with every read ending by ``deadline`` (``clock.monotonic()``).

    A socket timeout bounds each ``recv`` alone: a server that sends one byte every few
    seconds would keep a request alive for ever. Here every read gets only the time left,
    handed to the kernel as the socket's timeout.
    """

    def __init__(self, raw: Any, sock: socket.socket, deadline: float, clock: Clock) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline, self._clock = raw, sock, deadline, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - self._clock.monotonic()
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

    def __init__(self, sock: socket.socket, *args: Any, deadline: float | None = None, clock: Clock,
                 **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        if deadline is not None:
            self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, clock))


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
