"""Webhook alerts: which events notify, the payload, retries with backoff, never blocking the caller."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from certd.ops.alerts import ATTEMPTS, Alerter, payload
from certd.core.clock import FakeClock
from certd.config import AlertsConfig
from certd.core.events import LifecycleEvent
from tests.support.procs import free_port, wait_until

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class Server:
    """A local webhook answering with the queued status codes (then 204), recording requests."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[dict[str, Any]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                srv.requests.append({"headers": dict(self.headers), "json": json.loads(body)})
                status = srv.statuses.pop(0) if srv.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def ev(kind: str, **kw: Any) -> LifecycleEvent:
    return LifecycleEvent(kind, kw.pop("name", "www"), NOW, **kw)


def alerter(url: str, clock: FakeClock | None = None, **kw: Any) -> Alerter:
    return Alerter(AlertsConfig(url, **kw), clock or FakeClock(NOW), host="node-1")


def test_payload_carries_what_an_operator_needs_and_no_key_material():
    """kind, name, time, serials, error, severity, host; a rollback_failed is critical."""
    body = payload(ev("rollback_failed", old_serial="0a", new_serial=None, version=3,
                      detail={"error": "verify failed", "rollback_error": "nginx -t failed"}), "node-1")
    assert body["kind"] == "rollback_failed" and body["severity"] == "critical" and body["host"] == "node-1"
    assert body["time"] == "2026-03-01T12:00:00Z" and body["old_serial"] == "0a" and body["version"] == 3
    assert body["error"] == "verify failed; rollback: nginx -t failed"
    assert body["summary"].startswith("www: ROLLBACK FAILED")
    assert "PRIVATE KEY" not in json.dumps(body)


@pytest.mark.parametrize("kind,outcome,sent", [
    ("renewal_failed", "failed", True),
    ("renewal_failed", "rolled_back", False),       # the rolled_back notification covers it
    ("rolled_back", "rolled_back", True),
    ("rollback_failed", "rollback_failed", True),
    ("drift_found", "found", True),
    ("expiring_soon", "warning", True),
    ("renewed", "success", False),
    ("drift_repaired", "repaired", False),
])
def test_which_events_notify(server, kind, outcome, sent):
    """Failures, rollbacks, drift and approaching expiry notify; successes do not."""
    a = alerter(server.url)
    a.on_event(ev(kind, outcome=outcome))
    assert a.close(5)
    assert len(server.requests) == (1 if sent else 0)


def test_bearer_token_from_file_is_read_at_delivery(server, tmp_path):
    """The token file is read for each notification, so a rotated token is used without a restart."""
    token = tmp_path / "token"
    token.write_text("first\n")
    a = alerter(server.url, bearer_token_file=token)
    a.on_event(ev("drift_found"))
    wait_until(lambda: len(server.requests) == 1, timeout=5)
    token.write_text("second\n")
    a.on_event(ev("drift_found"))
    assert a.close(5)
    assert [r["headers"]["Authorization"] for r in server.requests] == ["Bearer first", "Bearer second"]


def test_server_errors_are_retried_with_backoff(server):
    """503, 503, then 204: delivered on the third attempt after waiting 1 s then 2 s (fake clock)."""
    server.statuses = [503, 503]
    clock = FakeClock(NOW)
    start = clock.monotonic()
    a = alerter(server.url, clock)
    a.on_event(ev("rolled_back"))
    assert a.close(5)
    assert len(server.requests) == 3
    assert 3.0 <= clock.monotonic() - start <= 3.3


def test_a_refusal_is_final_and_attempts_are_bounded(server, caplog):
    """401 is not retried (it names the token to check); 500 forever stops after ATTEMPTS tries."""
    server.statuses = [401]
    a = alerter(server.url)
    a.on_event(ev("rolled_back"))
    assert a.close(5)
    assert len(server.requests) == 1 and "check [alerts] bearer_token" in caplog.text
    server.statuses = [500] * 10
    b = alerter(server.url)
    b.on_event(ev("rolled_back"))
    assert b.close(5)
    assert len(server.requests) == 1 + ATTEMPTS


def test_on_event_returns_at_once_when_nobody_listens():
    """A webhook that is down costs the caller nothing: every notification is tried and given up
    behind the caller's back."""
    a = alerter(f"http://127.0.0.1:{free_port()}/hook")  # fake clock: the retries' waits are instant
    for _ in range(50):
        a.on_event(ev("drift_found"))
    assert a.close(10)  # every notification was tried ATTEMPTS times and given up


def test_on_event_never_waits_for_a_webhook_that_hangs():
    """A webhook that accepts and never answers holds the sender, not the caller: 50 events are
    queued while the first delivery is still stuck (no timing: the handler is blocked on purpose)."""
    release, arrived = threading.Event(), threading.Event()

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            arrived.set()
            release.wait(30)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stuck)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        a = alerter(f"http://127.0.0.1:{httpd.server_address[1]}/hook")
        a.on_event(ev("drift_found"))
        assert arrived.wait(10)               # the sender is now stuck inside the first delivery
        caller = threading.Thread(target=lambda: [a.on_event(ev("drift_found")) for _ in range(49)])
        caller.start()
        caller.join(10)                       # a deadline for a broken sink, not a measurement
        assert not caller.is_alive()          # the caller finished while the webhook still hangs
        release.set()
        assert a.close(10)
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


def test_not_configured_means_silent(tmp_path: Path):
    """Without [alerts] the sink ignores everything and starts no thread."""
    a = Alerter(None, FakeClock(NOW))
    a.on_event(ev("rollback_failed"))
    assert a._thread is None and a.close(0)
