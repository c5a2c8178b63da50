"""A flood of http-01 requests for unknown tokens (anyone can send them to port 80) does not
starve a fleet node's database connections: the node still renews (real Pebble) meanwhile.

Node 2 reaches PostgreSQL through a DelayProxy (a remote database: every answer 50 ms late), so
a lookup per flooded request would hold its small pool (certd.store.pg: 4 connections, POOL_WAIT
5 s) long enough to time the renewal's own store operations out.
"""

from __future__ import annotations

import http.client
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.delay_proxy import DelayProxy
from tests.support.fleet import Fleet, start_fleet
from tests.support.procs import wait_until

FLOODERS = 48
#: what scanners and an attacker send: junk that is no ACME token, and a few well-formed tokens
#: nobody issued, asked again and again
SHAPED = [secrets.token_urlsafe(32) for _ in range(4)]


@pytest.fixture
def slow_fleet(tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any,
               test_ca: Any) -> Iterator[Fleet]:
    """The fleet with node 2's database answers 50 ms late; every node serving version 1."""
    port = int(re.search(r"port=(\d+)", postgres).group(1))  # type: ignore[union-attr]
    with DelayProxy(port) as slow:
        with start_fleet(tmp_path, pebble_factory(), postgres, {"nginx": nginx_factory}, test_ca,
                         dsns=[None, re.sub(r"port=\d+", f"port={slow.port}", postgres)]) as fleet:
            for node in fleet.nodes:
                node.env.start_daemon()
            wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
            slow.delay = 0.05
            yield fleet


class Flood:
    """Threads asking one responder for tokens nobody published, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(FLOODERS)]

    def __enter__(self) -> Flood:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            token = SHAPED[n % len(SHAPED)] if i % 2 else secrets.token_hex(8) + ".php"
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", f"/.well-known/acme-challenge/{token}")
                status = conn.getresponse().status
            except OSError:
                with self._lock:
                    self.errors += 1
                continue
            finally:
                conn.close()
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1


def test_a_flood_of_unknown_tokens_does_not_stop_a_renewal(slow_fleet: Fleet) -> None:
    """Unknown-token requests flooding a node's http-01 responder get 404s while that node renews (real Pebble)."""
    fleet = slow_fleet
    node = fleet.nodes[1]
    with Flood(node.http_port) as flood:
        wait_until(lambda: sum(flood.statuses.values()) >= 200, timeout=30, interval=0.05, what="the flood under way")
        r = node.env.run("renew", "www", "--force", "--wait", "--reason", "flood test", check=None)
        asked = sum(flood.statuses.values())
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.1, what="every node serving version 2")
    assert len(fleet.ca.orders_created) == 2
    assert set(flood.statuses) == {404}, flood.statuses
    assert asked >= 400 and flood.errors == 0, (asked, flood.errors)
