"""The shipped systemd unit: hardened (exposure <= 2.0) and valid, as systemd itself judges."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


from tests.support.procs import wait_until

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "certd.service"


def test_unit_exposure_is_at_most_2_0() -> None:
    """systemd-analyze security rates the unit 2.0 or better ("OK")."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for certd\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    # the threshold flag agrees (0..100 scale)
    assert subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(UNIT)],
                          capture_output=True, timeout=60).returncode == 0


def test_unit_verifies_with_the_installed_entry_point(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit once /usr/bin/certd is where it points."""
    certd = Path(sys.executable).parent / "certd"
    assert certd.exists()
    unit = tmp_path / "certd.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/certd", str(certd)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "certd.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_daemon_speaks_the_notify_protocol(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """Under Type=notify the daemon sends READY=1, a STATUS= line, WATCHDOG=1 pings and STOPPING=1."""
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    messages: list[str] = []

    def received(text: str) -> bool:
        """Drain what has arrived so far (never blocks), then look for ``text``."""
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
        return any(text in m for m in messages)

    env = certd_env(pebble)
    env.write_config([env.http_cert("www", ["www.example.test"])])
    daemon = env.start_daemon(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
    wait_until(lambda: received("READY=1"), timeout=30, what="READY=1")
    wait_until(lambda: received("STATUS=1 certificates"), timeout=30, what="STATUS line")
    wait_until(lambda: received("WATCHDOG=1") and sum("WATCHDOG=1" in m for m in messages) >= 2, timeout=5,
               what="two watchdog pings")
    daemon.stop(timeout=30)
    assert received("STOPPING=1")
    assert daemon.returncode == 0
    sock.close()


def test_unit_forbids_core_dumps_and_bounds_memory_and_tasks() -> None:
    """No core file can hold a private key; memory and tasks are capped at sizes that fit the
    largest supported site (100,000 certificates in 1 GB), the knobs documented in the unit."""
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["LimitCORE"] == "0"
    memory = settings["MemoryMax"]
    assert memory.endswith("M") and 1024 < int(memory[:-1]) <= 4096
    assert 256 <= int(settings["TasksMax"]) <= 4096
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert "LimitCORE" not in r.stderr and "MemoryMax" not in r.stderr and "TasksMax" not in r.stderr, r.stderr
