"""sd_notify never holds the daemon: a notify socket nobody reads drops lines, it does not block."""

from __future__ import annotations

import logging
import socket
import threading

from certd.daemon import systemd


def test_a_notify_socket_nobody_reads_drops_lines_instead_of_blocking(tmp_path, monkeypatch, caplog):
    """The STATUS= lines a receiver never reads fill its queue; then a plain sendto blocked for
    good, and the daemon's STOPPING=1 held its shutdown until SIGKILL (seen at 100,000
    certificates under a benchmark that stopped reading after READY=1)."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))  # never read
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setattr(systemd, "NOTIFY_TIMEOUT", 0.05, raising=False)
    caplog.set_level(logging.WARNING, logger="certd.daemon")

    def fill() -> None:
        for i in range(5000):  # far beyond net.unix.max_dgram_qlen (512 by default)
            systemd.sd_notify(f"STATUS=line {i}")
            if "sd_notify failed" in caplog.text:
                return

    sender = threading.Thread(target=fill, daemon=True)
    sender.start()
    sender.join(timeout=20)
    receiver.close()
    assert not sender.is_alive(), "sd_notify blocked on a full notify socket"
    assert "sd_notify failed" in caplog.text
