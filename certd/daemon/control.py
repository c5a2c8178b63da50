"""The daemon's local control API: HTTP over a Unix socket, and the CLI's client for it.

Who may call: the socket file is mode 0660 (owner and ``control_group``), so the kernel refuses
everybody else at ``connect()``. The server also reads the caller's uid from ``SO_PEERCRED``
and records ``uid=N(user)`` as the initiator of every action; mutating calls are allowed for
root, the daemon's own user and members of ``control_group``.

Endpoints (JSON; long operations stream NDJSON progress events, the last line the result):

    GET  /v1/status[?name=a&name=b]   {"certificates": [...]}
    POST /v1/renew     {"names": [...], "all": bool, "force": bool, "reason": str}
    POST /v1/rollback  {"name": str, "to_version": int|null, "reason": str}
    POST /v1/revoke    {"name": str, "reason": "keyCompromise"|"superseded"|...}
    POST /v1/verify    {"names": [...]}
    POST /v1/reload    reload the configuration file
    GET  /v1/history[?name=a]  {"records": [...], "chain_intact": bool}  (read-only)
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qs, urlparse

from certd.core.errors import CertdError, UsageError
from certd.daemon.control_conn import Caller, Handler, Limits, Server, peer_credentials
from certd.ops.log import event
# The client lives apart so that the CLI's status, which only asks whether a daemon answers, does
# not import the server (http.server) nor httpx (~0.15 s with bytecode); re-exported here.
from certd.daemon.control_client import ControlClient, DaemonNotRunning, rows_document, rows_document_chunks

log = logging.getLogger("certd.control")

__all__ = ["Caller", "ControlClient", "ControlServer", "DaemonNotRunning", "Handler", "Preformatted",
           "peer_credentials", "rows_document"]

CLIENT_TIMEOUT = 10.0  # seconds a client has for its whole request (headers and body), not per read
STOP_GRACE = 5.0       # seconds stop() gives answers still being written (a renewal's result)
MAX_BODY = 64 * 1024   # bytes: the largest request body (a renewal naming ~2,000 certificates)
MAX_CLIENTS = 64       # clients served at once; beyond that "certd is busy" (503)
MAX_CLIENTS_PER_UID = 16  # for a caller other than root and certd's user: the rest stays free for them
BUSY_LINGER = 1.0      # seconds a busy answer's socket stays open, so the client can send and read
MAX_LINGERING = 256    # busy answers lingering at once; beyond that they are closed at once (a flood
                       # must not use up the daemon's file descriptors)


class ControlServer:
    def __init__(self, path: Path, routes: dict[tuple[str, str], Handler], *, group: str | None = None,
                 mutating: set[str] | None = None) -> None:
        self.path = path
        self.routes = routes
        self.group = group
        self.mutating = mutating or set()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    def allowed(self, caller: Caller) -> bool:
        if caller.uid in (0, os.getuid()):
            return True
        if self.group is None:
            return False
        try:
            g = grp.getgrnam(self.group)
        except KeyError:
            return False
        return caller.gid == g.gr_gid or (caller.user is not None and caller.user in g.gr_mem)

    def start(self) -> None:
        if self.path.is_socket() or self.path.exists():
            if _socket_answers(self.path):
                raise UsageError(f"another certd already listens on {self.path}")
        outer = self
        # Bind in a private 0700 directory beside the final path, set group and mode there
        # (nobody else can reach that directory, so the path names our socket), then rename
        # it into place: there is no moment at which the socket is reachable with the wrong
        # mode, and no chown/chmod on a path someone else could swap. (fchmod on a socket's
        # descriptor does not change the file; the umask is process-wide and would race
        # other threads.)
        private = Path(tempfile.mkdtemp(prefix=".certd-sock-", dir=self.path.parent))
        try:
            staged = private / "s"
            self._server = Server(str(staged), _make_handler(outer), _limits())
            if self.group is not None:
                os.chown(staged, -1, grp.getgrnam(self.group).gr_gid, follow_symlinks=False)
            os.chmod(staged, 0o660)
            os.rename(staged, self.path)
        except BaseException:
            if self._server is not None:
                self._server.server_close()
                self._server = None
            raise
        finally:
            try:
                os.unlink(private / "s")
            except FileNotFoundError:
                pass
            os.rmdir(private)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()
        event(log, "control_listening", path=self.path, group=self.group)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # no new clients
            self._server.finish_answers(STOP_GRACE)
            self._server.server_close()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _make_handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        timeout = CLIENT_TIMEOUT  # for the request: a client that connects and says nothing is dropped

        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("control %s", format % args)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            route = server.routes.get((method, url.path))
            if route is None:
                return self._send(404, {"error": f"no such endpoint {method} {url.path}"})
            caller = peer_credentials(self.connection)
            if url.path in server.mutating and not server.allowed(caller):
                event(log, "control_refused", logging.WARNING, caller=caller, path=url.path)
                return self._send(403, {"error": f"{caller} may not call {url.path}; "
                                                 "ask for membership of the control group"})
            try:
                body = self._body() if method == "POST" else {k: v for k, v in parse_qs(url.query).items()}
                self.server.watchdog.done(self.connection)  # type: ignore[attr-defined]
                self.connection.settimeout(None)  # the request is in; an answer may take minutes
                result = route(caller, body)
                if isinstance(result, Preformatted):
                    result.prime()  # its first rows: a failure there is answered as any other
            except UsageError as e:
                return self._send(400, {"error": str(e), "exit_code": 2})
            except CertdError as e:
                return self._send(500, {"error": str(e), "exit_code": e.exit_code})
            except Exception as e:  # a bug must not kill the control thread
                log.exception("control handler failed")
                return self._send(500, {"error": f"internal error: {type(e).__name__}: {e}", "exit_code": 1})
            if isinstance(result, Iterator):
                self._stream(result)
            else:
                self._send(200, result)

        def _body(self) -> dict[str, Any]:
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                raise UsageError("request without Content-Length; send the JSON body with its length")
            try:
                n = int(raw_length.strip())
            except ValueError:
                raise UsageError(f"bad Content-Length {raw_length[:40]!r}; expected a number of bytes") from None
            if n < 0:
                raise UsageError(f"bad Content-Length {n}; expected a number of bytes")
            if n > MAX_BODY:
                raise UsageError(f"request body of {n} bytes is too large (at most {MAX_BODY})")
            raw = self.rfile.read(n) if n else b"{}"
            if len(raw) < n:
                raise UsageError("request body cut short (the client stopped sending, or took too long)")
            try:
                data = json.loads(raw)
            except ValueError:
                raise UsageError("request body is not JSON") from None
            if not isinstance(data, dict):
                raise UsageError("request body must be a JSON object")
            return data

        def _send(self, status: int, payload: Any) -> None:
            if isinstance(payload, Preformatted):
                return self._send_streamed(payload)
            data = json.dumps(payload).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_streamed(self, document: Preformatted) -> None:
            """Each piece as it is made, the end of the body the end of the connection (HTTP/1.0):
            a failure part-way closes it without the document's end, which the client notices."""
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            pieces = document.pieces()
            while True:
                try:
                    chunk = next(pieces)
                except StopIteration:
                    return
                except Exception:  # making a row (an OSError too: it is ours, not the client's)
                    log.exception("control answer failed part-way; the client is told it was cut short")
                    return
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return  # the client went away (certd status | head -1)

        def _stream(self, events: Iterator[Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            try:
                for item in events:
                    self.wfile.write(json.dumps(item).encode() + b"\n")
                    self.wfile.flush()
            except OSError:
                pass  # the engineer pressed ^C (or the daemon is stopping); the work goes on

    return H


def _limits() -> Limits:
    """The limits as this module sets them now (read at each start, so a test may lower them)."""
    return Limits(CLIENT_TIMEOUT, MAX_CLIENTS, MAX_CLIENTS_PER_UID, BUSY_LINGER, MAX_LINGERING)


class Preformatted:
    """A route's answer that is JSON text already: ``rows_document(key, rows)``, sent as it is
    in the pieces of :func:`rows_document_chunks`, each as ``rows`` (an iterator) makes it."""

    def __init__(self, key: str, rows: Iterable[dict[str, Any] | str]) -> None:
        self._rest = rows_document_chunks(key, rows)
        self._made: list[bytes] = []

    def prime(self) -> None:
        """Make the document's head and first piece now (before the answer's status line goes
        out): a listing that fails at once is an error answer with its message, not a cut."""
        self._made = [next(self._rest), next(self._rest)]  # the head, then the first rows or the end

    def pieces(self) -> Iterator[bytes]:
        yield from self._made
        yield from self._rest


def _socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
