"""The control socket's connections: who is calling (``SO_PEERCRED``), and the limits that keep
a flood or a slow client from taking the daemon's threads or file descriptors: a deadline per
request, enforced by one watchdog thread; a bounded number of clients at once, fewer per
unprivileged caller; "busy" answers beyond that (:class:`Limits`, whose values
:mod:`certd.daemon.control` sets). What the requests mean is that module's business.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from certd.ops.log import event

log = logging.getLogger("certd.control")


class Caller:
    def __init__(self, uid: int, gid: int, pid: int) -> None:
        self.uid, self.gid, self.pid = uid, gid, pid
        try:
            self.user: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            self.user = None

    def __str__(self) -> str:
        return f"uid={self.uid}({self.user})" if self.user else f"uid={self.uid}"


def peer_credentials(sock: socket.socket) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Caller(uid, gid, pid)


# A handler returns a JSON-able result, or an iterator of events (streamed) whose last item is the result.
Handler = Callable[[Caller, dict[str, Any]], Any]


@dataclass(frozen=True)
class Limits:
    """What one client may take (see certd.daemon.control for the values and why)."""

    client_timeout: float      # seconds for a whole request (headers and body), not per read
    max_clients: int           # clients served at once; beyond that "certd is busy" (503)
    max_clients_per_uid: int   # for a caller other than root and certd's user
    busy_linger: float         # seconds a busy answer's socket stays open
    max_lingering: int         # busy answers lingering at once; beyond that closed at once


class Watchdog:
    """One thread that enforces every client's request deadline: when it passes, the client's
    socket is shut down, which ends the handler's blocked read. (A timeout per read would let
    a client that sends one byte every 9 s keep its thread for ever; a thread per client to
    watch it would double the threads an attacker can make us hold.) Also closes the sockets
    of busy answers after their linger time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[socket.socket, tuple[float, bool]] = {}  # sock -> (when, close it?)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="control-watchdog", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float, *, close: bool = False) -> None:
        with self._cond:
            # Real time, not the daemon's Clock (here and in _run): these deadlines cut off real
            # sockets whose peers run in real time; on a test's fake clock nobody would be cut off.
            self._deadlines[sock] = (time.monotonic() + seconds, close)
            self._cond.notify()

    def lingering(self) -> int:
        with self._cond:
            return sum(close for _, close in self._deadlines.values())

    def done(self, sock: socket.socket) -> None:
        """The request is in (or the client is gone): its deadline no longer applies."""
        with self._cond:
            self._deadlines.pop(sock, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(2.0)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                for sock, (when, close) in list(self._deadlines.items()):
                    if when <= now:
                        del self._deadlines[sock]
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                            if close:
                                sock.close()
                        except OSError:
                            pass
                nxt = min((w for w, _ in self._deadlines.values()), default=None)
                self._cond.wait(None if nxt is None else max(0.01, nxt - now))
            for sock, (_, close) in self._deadlines.items():
                if close:  # busy answers still lingering: the server is going away
                    sock.close()
            self._deadlines.clear()


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per client, at most ``limits.max_clients`` of them. The threads are daemon threads (a
    stuck client never keeps the process alive), so the server keeps its own list to let a
    stopping daemon finish its answers: the result of a renewal that ended during shutdown
    must reach whoever waits on it."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen() backlog: a burst of clients is accepted (and told "busy"), not refused

    def __init__(self, path: str, handler: Any, limits: Limits) -> None:
        super().__init__(path, handler)
        self.limits = limits
        self._clients: dict[threading.Thread, int] = {}  # thread -> caller's uid
        self._clients_lock = threading.Lock()
        self.watchdog = Watchdog()
        self.busy_answers = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            uid = peer_credentials(request).uid
        except OSError:
            self.shutdown_request(request)
            return
        with self._clients_lock:
            self._clients = {c: u for c, u in self._clients.items() if c.is_alive()}
            busy = len(self._clients) >= self.limits.max_clients or (
                uid not in (0, os.getuid())
                and sum(u == uid for u in self._clients.values()) >= self.limits.max_clients_per_uid)
            if not busy:
                t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                     name="control-client", daemon=True)
                self._clients[t] = uid
        if busy:
            return self._busy(request, uid)
        self.watchdog.watch(request, self.limits.client_timeout)
        t.start()

    def _busy(self, request: socket.socket, uid: int) -> None:
        """Answer 503 without reading the request, from the accepting thread: a fresh socket's
        send buffer takes these bytes at once. The socket stays open ``busy_linger`` seconds so the
        client can finish sending its request and read the answer (closing it at once would
        fail the client's write instead)."""
        self.busy_answers += 1
        if self.busy_answers == 1 or self.busy_answers % 1000 == 0:
            event(log, "control_busy", logging.WARNING, clients=self.limits.max_clients, uid=uid,
                  refused=self.busy_answers)
        body = json.dumps({"error": f"certd is busy ({self.limits.max_clients} control clients at once, or "
                                    f"{self.limits.max_clients_per_uid} from uid {uid}); try again in a few seconds",
                           "exit_code": 1}).encode() + b"\n"
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + body)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        if self.watchdog.lingering() >= self.limits.max_lingering:
            request.close()
            return
        self.watchdog.watch(request, self.limits.busy_linger, close=True)

    def shutdown_request(self, request: Any) -> None:
        self.watchdog.done(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (or was cut off at its deadline) is not news; a bug is."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("control client gone", exc_info=True)
        else:
            log.exception("control client failed")

    def finish_answers(self, timeout: float) -> None:
        # Real time: a bound on joining real threads that write to real sockets at shutdown.
        deadline = time.monotonic() + timeout
        with self._clients_lock:
            clients = list(self._clients)
        for c in clients:
            c.join(max(0.0, deadline - time.monotonic()))

    def active_clients(self) -> int:
        with self._clients_lock:
            return sum(c.is_alive() for c in self._clients)

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.stop()
