"""The control server on a real Unix socket, in this process: what a client of a stopping
daemon receives, and what happens to a client that never sends its request."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from certd.core.errors import OperationFailed
from certd.daemon import control
from certd.daemon.control import ControlClient, ControlServer, Preformatted, rows_document
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


def _raw(path: Path, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as it is and read the whole answer (the server closes after it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture
def renew_server(tmp_path: Path) -> Iterator[tuple[ControlServer, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    server = ControlServer(tmp_path / "control.sock",
                           {("POST", "/v1/renew"): lambda caller, body: seen.append(body) or {"accepted": []},
                            ("GET", "/v1/status"): lambda caller, body: {"certificates": []}})
    server.start()
    try:
        yield server, seen
    finally:
        server.stop()


@pytest.mark.parametrize("length, why", [(None, b"without Content-Length"), ("-1", b"bad Content-Length -1"),
                                         ("1048576", b"too large"), ("12abc", b"bad Content-Length")])
def test_a_bad_content_length_is_answered_400_without_reading_the_body(
        renew_server: tuple[ControlServer, list[dict[str, Any]]], length: str | None, why: bytes) -> None:
    """Content-Length -1 used to read to the end of the stream (the daemon grew by 600 MiB)."""
    server, seen = renew_server
    head = b"POST /v1/renew HTTP/1.0\r\n" + (f"Content-Length: {length}\r\n".encode() if length else b"") + b"\r\n"
    answer = _raw(server.path, head + b'{"names": []}')
    assert answer.startswith(b"HTTP/1.0 400"), answer
    assert why in answer and seen == []


def test_the_deadline_covers_the_whole_request_not_each_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends one byte at a time, each well within the old per-read timeout, is
    still cut off when its request as a whole is late."""
    monkeypatch.setattr(control, "CLIENT_TIMEOUT", 1.0)
    path = tmp_path / "control.sock"
    server = ControlServer(path, {("GET", "/v1/status"): lambda caller, body: {"certificates": []}})
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.settimeout(10)
            slow.connect(str(path))
            started = time.monotonic()
            closed = False
            for b in b"GET /v1/status HTTP/1.0\r\nX-Slow: " + b"a" * 200:
                try:
                    slow.sendall(bytes([b]))
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.1)
                try:
                    if slow.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed, "the server kept reading a request that trickled in for 20 s"
            assert time.monotonic() - started < 5
    finally:
        server.stop()


def test_beyond_max_clients_the_answer_is_busy_and_the_cli_prints_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Held connections cost one thread each up to MAX_CLIENTS; the next caller hears "busy"
    at once (not a hang), and is served again once they are gone."""
    monkeypatch.setattr(control, "MAX_CLIENTS", 4)
    path = tmp_path / "control.sock"
    server = ControlServer(path, {("GET", "/v1/status"): lambda caller, body: {"certificates": []}})
    server.start()
    held = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            held.append(s)
        assert server._server is not None
        wait_until(lambda: server._server.active_clients() == 4, timeout=10, what="4 clients held")
        with pytest.raises(OperationFailed, match="certd is busy"):
            ControlClient(path).get("/v1/status")
        assert server._server.active_clients() == 4
        for s in held:
            s.close()
        wait_until(lambda: server._server.active_clients() == 0, timeout=10, what="held clients gone")
        assert ControlClient(path).get("/v1/status") == {"certificates": []}
    finally:
        for s in held:
            s.close()
        server.stop()


def test_the_socket_appears_with_its_mode_and_leaves_no_private_directory(tmp_path: Path) -> None:
    """Bound in a private directory and renamed into place: 0660 from its first instant on the
    final path, and nothing left beside it."""
    path = tmp_path / "control.sock"
    server = ControlServer(path, {})
    server.start()
    try:
        assert path.is_socket() and stat.S_IMODE(path.lstat().st_mode) == 0o660
        assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock"]
    finally:
        server.stop()
    assert not path.exists()


@pytest.mark.parametrize("count", [0, 1, 2500])
def test_a_preformatted_document_arrives_whole_in_its_pieces(tmp_path: Path, count: int) -> None:
    """The daemon's status listing is sent in pieces of 1,000 rows as they are made (not made and
    joined first: 280 MB for a moment at 100,000); the client gets exactly rows_document's text."""
    rows: list[dict[str, Any] | str] = [json.dumps({"name": f"c{i:05d}", "n": i}) if i % 2 else {"name": f"c{i:05d}", "n": i}
                                        for i in range(count)]
    path = tmp_path / "control.sock"
    server = ControlServer(path, {("GET", "/v1/status"): lambda caller, body: Preformatted("certificates", rows)})
    server.start()
    try:
        text = ControlClient(path).get_text("/v1/status")
    finally:
        server.stop()
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]  # rows_document's text, one row a line
    assert text == rows_document("certificates", rows) == '{"certificates": [\n' + ",\n".join(lines) + "\n]}\n"
    assert [r["n"] for r in json.loads(text)["certificates"]] == list(range(count))


@pytest.mark.parametrize("error", [RuntimeError("a bug"), PermissionError(13, "Permission denied")])
def test_a_document_that_fails_part_way_is_an_error_not_a_short_listing(
        tmp_path: Path, error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    """A streamed listing has no Content-Length: if making a row fails after the first pieces
    went out, the client must not print a valid-looking shorter document (jq would accept it),
    and the daemon's log says why (an OSError of its own is not the client going away); one
    that fails at its first row is an error answer with the message, as any route's."""
    def rows(fail_at: int) -> Iterator[str]:
        for i in range(2500):
            if i == fail_at:
                raise error
            yield json.dumps({"name": f"c{i:05d}"})

    path = tmp_path / "control.sock"
    server = ControlServer(path, {("GET", "/v1/status"): lambda caller, body: Preformatted("certificates", rows(1500)),
                                  ("GET", "/v1/other"): lambda caller, body: Preformatted("certificates", rows(0))})
    server.start()
    try:
        with pytest.raises(OperationFailed, match="did not answer in full"):
            ControlClient(path).get_text("/v1/status")
        wait_until(lambda: "failed part-way" in caplog.text, timeout=5, what="the failure logged")
        with pytest.raises(OperationFailed, match="internal error|Permission denied"):
            ControlClient(path).get_text("/v1/other")
    finally:
        server.stop()
