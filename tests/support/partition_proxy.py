"""A TCP proxy on loopback that can cut one client off from a server without closing anything.

    proxy = PartitionProxy(("127.0.0.1", pg_port)).start()   # 127.0.0.1:<proxy.port> -> server
    proxy.partition()     # nothing crosses in either direction; connections stay open
    proxy.heal()          # what was held is delivered, in order, and forwarding resumes
    proxy.stop()          # closes every connection it accepted

A partition is a black hole, not a refusal: new connections are accepted (the client's connect
succeeds, as through a router that drops packets later) and every byte read from either side is
held until :meth:`heal`, so a client waits on its own timeouts exactly as it would on a cut
network; nothing is ever reset or closed by the partition itself.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["PartitionProxy"]


class PartitionProxy:
    """``127.0.0.1:<port>`` -> ``target``; :meth:`partition` / :meth:`heal` cut and restore it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name=f"partition-proxy-{self.port}", daemon=True)

    def start(self) -> PartitionProxy:
        self._thread.start()
        return self

    def partition(self) -> None:
        """From now on forward nothing, either way, until :meth:`heal`."""
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._stopped.set()
        self._open.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for s in sockets:
            _close(s)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # during a partition the client's connection leads nowhere (yet)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        with self._lock:
            self.connections += 1
            self._sockets.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stopped.is_set():
                data = src.recv(65536)
                if not data:
                    break
                self._open.wait()  # held, not dropped: a partition shorter than TCP's patience
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
