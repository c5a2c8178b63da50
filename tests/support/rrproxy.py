"""A round-robin TCP proxy: the load balancer in front of a fleet's nodes.

Listens on one address and hands each new connection to the next backend in turn (skipping one
that refuses), copying bytes both ways until either side closes. ``counts`` says how many
connections each backend got, so a test can show that validation requests really were spread.
Stopped by :meth:`stop` (the accept loop is woken by closing the listening socket).
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Sequence


class RoundRobinProxy:
    def __init__(self, listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
        self.backends = list(backends)
        self.counts = [0] * len(self.backends)
        self.events: list[str] = []  # connection failures, for a failing test's message
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self._sock = socket.create_server(listen, reuse_port=False, backlog=128)
        self._thread = threading.Thread(target=self._accept, name="rr-proxy", daemon=True)
        self._closed = False

    def start(self) -> RoundRobinProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closed = True
        self._sock.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        with self._lock:
            start = next(self._next)
        for k in range(len(self.backends)):  # each backend once, from this connection's turn
            i = (start + k) % len(self.backends)
            try:
                upstream = socket.create_connection(self.backends[i], timeout=5)
            except OSError as e:
                self.events.append(f"{i}: {e}")
                continue  # that node is down: the load balancer's health check would skip it too
            with self._lock:
                self.counts[i] += 1
            return upstream
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            self.events.append("no backend")
            client.close()
            return
        upstream.settimeout(None)
        done = threading.Event()

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError as e:
                self.events.append(f"pipe: {e}")
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                done.set()

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        done.wait(10)
        client.close()
        upstream.close()
