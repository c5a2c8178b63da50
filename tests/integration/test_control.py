"""The control server on a real Unix socket, in this process: what a client of a stopping
daemon receives, and what happens to a client that never sends its request."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from certd import control
from certd.control import ControlClient, ControlServer
from tests.support.procs import wait_until


def test_a_client_that_sends_nothing_is_dropped_and_others_are_still_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung script or a stray `nc -U` does not keep a server thread for ever."""
    monkeypatch.setattr(control, "CLIENT_TIMEOUT", 0.3)
    path = tmp_path / "control.sock"
    server = ControlServer(path, {("GET", "/v1/status"): lambda caller, body: {"certificates": []}})
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(10)
            silent.connect(str(path))
            assert ControlClient(path).get("/v1/status") == {"certificates": []}
            assert silent.recv(1) == b""  # closed by the server, not our 10 s timeout
    finally:
        server.stop()


def test_stop_lets_an_answer_being_streamed_finish(tmp_path: Path) -> None:
    """A `renew --wait` whose renewal ends while the daemon stops gets that result, not a cut
    connection: stop() waits for answers being written (up to STOP_GRACE)."""
    path = tmp_path / "control.sock"
    finishing = threading.Event()

    def renew(caller: Any, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {"event": "progress", "message": "switched to version 2"}
        finishing.wait(30)
        yield {"event": "result", "outcomes": [{"name": "www", "result": "renewed", "ok": True}]}

    server = ControlServer(path, {("POST", "/v1/renew"): renew})
    server.start()
    received: list[dict[str, Any]] = []
    follower = threading.Thread(target=lambda: received.extend(ControlClient(path).stream("/v1/renew", {})))
    follower.start()
    wait_until(lambda: len(received) >= 1 or not follower.is_alive(), timeout=10, what="the first progress event")
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "stop() returned while an answer was still being written"
    finishing.set()
    stopper.join(10)
    follower.join(10)
    assert not stopper.is_alive() and not path.exists()
    assert [e["event"] for e in received] == ["progress", "result"]
    assert received[-1]["outcomes"][0]["result"] == "renewed"
