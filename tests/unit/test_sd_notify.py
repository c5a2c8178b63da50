"""sd_notify never holds the daemon: a notify socket nobody reads drops lines, it does not block."""

from __future__ import annotations

import logging
import socket
import threading
import time

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
        for i in range(5000):  # far beyond net.unix.max_dgram_qlen (10 by default; systemd sets 512)
            systemd.sd_notify(f"STATUS=line {i}")
            if "sd_notify failed" in caplog.text:
                return

    sender = threading.Thread(target=fill, daemon=True)
    sender.start()
    sender.join(timeout=20)
    receiver.close()
    assert not sender.is_alive(), "sd_notify blocked on a full notify socket"
    assert "sd_notify failed" in caplog.text

    # ... and waiting for room does not spin: a dropped line costs its wait, not a core for it
    cpu: list[float] = []

    def one() -> None:
        began = time.thread_time()
        systemd.sd_notify("STATUS=one more")
        cpu.append(time.thread_time() - began)

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path.unlink()
    receiver.bind(str(path))
    caplog.clear()
    fill()  # full again
    assert "sd_notify failed" in caplog.text
    caplog.clear()
    monkeypatch.setattr(systemd, "NOTIFY_TIMEOUT", 0.5, raising=False)
    sender = threading.Thread(target=one, daemon=True)
    sender.start()
    sender.join(timeout=20)
    receiver.close()
    assert "sd_notify failed" in caplog.text  # dropped after its wait
    assert cpu and cpu[0] < 0.25, f"a dropped line cost {cpu} s of CPU waiting for room"
