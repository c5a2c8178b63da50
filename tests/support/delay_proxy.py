"""A TCP proxy on loopback that makes a server slow, for fault-injection tests.

    with DelayProxy(pebble.ports.acme) as proxy:      # 127.0.0.1:<proxy.port> -> <target>
        proxy.delay = 5.0                              # hold every answer 5 s
        proxy.trickle = 0.5                            # or: dribble answers 1 byte per 0.5 s
        proxy.delay = 0.0; proxy.trickle = 0.0         # back to a fast server
        proxy.hold(); ...; proxy.release()             # no answer at all until released
        proxy.cut_after(b"COMMIT")                     # forward it, lose the server's reply

It forwards raw bytes both ways, so TLS passes through untouched (the client still verifies
the real server's certificate; Pebble's is valid for 127.0.0.1). Only what the *server* sends
is slowed down: ``delay`` holds each chunk before forwarding it, ``trickle`` forwards it one
byte at a time with a pause between bytes (a server that keeps the connection alive but never
finishes, which a per-read socket timeout does not catch), ``hold()`` keeps every answer until
``release()`` (a test decides when the server answers), ``cut_after(marker)`` forwards the
next client message holding ``marker`` and then closes that connection instead of forwarding
the server's answer (a reply lost after the server acted: a COMMIT that committed; ``cuts``
counts them). Settings apply to data read after the change. ``stop()`` closes every connection it accepted; nothing else is ever signalled.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

__all__ = ["DelayProxy"]


class DelayProxy:
    """``127.0.0.1:<port>`` -> ``<host>:<target_port>``, answers slowed by ``delay`` / ``trickle``."""

    def __init__(self, target_port: int, delay: float = 0.0, *, host: str = "127.0.0.1",
                 trickle: float = 0.0) -> None:
        self.target = (host, target_port)
        self.delay = delay
        self.trickle = trickle
        self.connections = 0        # accepted so far
        self.bytes_from_server = 0  # forwarded to clients so far
        self.cuts = 0               # connections closed by cut_after, the server's answer lost
        self._cut_marker: bytes | None = None
        self._cutting: set[socket.socket] = set()  # upstreams whose next answer is lost
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name=f"delay-proxy-{self.port}", daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        return self

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def hold(self) -> None:
        """From now on, forward nothing the server sends until :meth:`release`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def cut_after(self, marker: bytes) -> None:
        """Once: forward the next client data holding ``marker``, then close that connection
        (both sides) when the server answers it, without forwarding the answer."""
        with self._lock:
            self._cut_marker = marker

    def stop(self) -> None:
        """Stop accepting and close every proxied connection (both sides)."""
        self._stopped.set()
        self._released.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for s in sockets:
            _close(s)
        self._thread.join(timeout=5)

    # -- internals ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while not self._stopped.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_server:
                    with self._lock:
                        cut = src in self._cutting
                        self.cuts += cut
                    if cut:
                        break  # the answer is lost with the connection
                    self._slow_send(dst, data)
                else:
                    with self._lock:  # armed before forwarding: the answer cannot come first
                        if self._cut_marker is not None and self._cut_marker in data:
                            self._cut_marker = None
                            self._cutting.add(dst)
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            # One side is done: end both, so neither end waits for the other forever.
            _close(src)
            _close(dst)
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)

    def _slow_send(self, dst: socket.socket, data: bytes) -> None:
        self._released.wait()
        if self._stopped.is_set():
            return
        if self.delay > 0:
            self._sleep(self.delay)
        if self.trickle > 0:
            for i in range(len(data)):
                if self._stopped.is_set():
                    return
                dst.sendall(data[i:i + 1])
                self.bytes_from_server += 1
                if self.trickle > 0:
                    self._sleep(self.trickle)
            return
        dst.sendall(data)
        self.bytes_from_server += len(data)

    def _sleep(self, seconds: float) -> None:
        """A pause that ends early when the proxy stops (so teardown never waits on it)."""
        self._stopped.wait(seconds)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass

