"""Attacks on the control socket (issue 12: F6, F7, F9), run for real against a running certd
by an unprivileged member of its control group.

The daemon runs as root with ``control_group`` = the attacker's own group, so the attacker may
connect (the socket is 0660 root:group) and speaks HTTP to it directly with a script of its own
(tests/security/attack_control.py, run with the system's python3). Each attack stops by itself
within its bound; each failed on the code before the fix (see the docstrings).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from certd.ops.audit import open_for
from certd.core.events import LifecycleEvent
from tests.support.certd_env import CertdEnv
from tests.support.procs import ManagedProcess, wait_until
from tests.support.unpriv import UnprivUser

ATTACK = Path(__file__).with_name("attack_control.py")
PYTHON = "/usr/bin/python3"  # the attacker cannot reach the project's interpreter under /root


def _proc_status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def _attack(attacker: UnprivUser, *args: str, timeout: float = 60) -> dict[str, Any]:
    r = attacker.run([PYTHON, str(attacker.readable(ATTACK)), *args], timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def daemon(attacker: UnprivUser, certd_env: Any, pebble: Any) -> Iterator[tuple[CertdEnv, ManagedProcess]]:
    """A running certd (as root) whose control socket the attacker's group may use."""
    work = attacker.workdir()
    env: CertdEnv = certd_env(pebble, work)
    env.daemon_extra = {"control_group": attacker.name}
    env.write_config([env.http_cert("www", ["www.example.test"])])
    proc = env.start_daemon()
    yield env, proc


def test_f6_a_negative_or_huge_content_length_is_answered_400_and_memory_stays_bounded(
        attacker: UnprivUser, daemon: tuple[CertdEnv, ManagedProcess]) -> None:
    """Content-Length -1 made the old server read to the end of the stream: 256 MiB sent, the
    daemon's peak memory grew by as much. Now: 400 at once, the body never read."""
    env, proc = daemon
    assert proc.pid is not None
    before = _proc_status(proc.pid, "VmHWM")  # kB, peak resident set so far
    seen = _attack(attacker, "f6", str(env.socket), "256")
    grown_mib = (_proc_status(proc.pid, "VmHWM") - before) / 1024
    assert seen["status"].startswith("HTTP/1.0 400"), seen
    assert "Content-Length" in seen["answer"], seen
    assert grown_mib < 32, f"the daemon's peak memory grew by {grown_mib:.0f} MiB ({seen['sent_mib']} MiB sent)"
    assert proc.alive
    env.run("status", check=0)  # still serving
    print(f"F6: peak memory grew {grown_mib:.1f} MiB; attacker saw {seen['status']!r} after {seen['sent_mib']} MiB")


def test_f7_many_slow_clients_hold_bounded_threads_hear_busy_and_a_real_client_is_served(
        attacker: UnprivUser, daemon: tuple[CertdEnv, ManagedProcess]) -> None:
    """300 clients trickling a request one byte a second used to hold 300 threads, each
    forever (the 10 s timeout was per read). Now: at most 16 per unprivileged uid, the rest
    are told "busy", those held are cut at the 10 s request deadline, and root's `certd
    status` is served during the attack and after it."""
    env, proc = daemon
    assert proc.pid is not None
    wait_until(lambda: env.status()["www"].get("version"), timeout=60, interval=0.2,
               what="the start-up issuance to finish (a quiet daemon to count threads in)")
    baseline = _proc_status(proc.pid, "Threads")
    attack = subprocess.Popen(attacker.argv([PYTHON, str(attacker.readable(ATTACK)), "f7", str(env.socket), "300", "13"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        peak = baseline

        def sample() -> bool:
            nonlocal peak
            peak = max(peak, _proc_status(proc.pid, "Threads"))  # type: ignore[arg-type]
            return attack.poll() is not None

        wait_until(lambda: (sample(), _proc_status(proc.pid, "Threads") > baseline + 4)[1],  # type: ignore[arg-type]
                   timeout=20, interval=0.05, what="the attacker's clients to be held")
        during = env.run("status", timeout=30)
        wait_until(sample, timeout=45, interval=0.05, what="the attack to end by itself")
        out, err = attack.communicate(timeout=10)
    finally:
        if attack.poll() is None:
            attack.kill()
            attack.wait(10)
    seen = json.loads(out.strip().splitlines()[-1])
    assert during.returncode == 0 and "www" in during.stdout, during.stderr
    assert peak - baseline <= 20, f"{peak - baseline} extra threads for {seen}"
    assert seen["busy"] >= 250, seen          # told at once, not left hanging
    assert seen["cut"] >= 1 and seen["held_to_the_end"] == 0, seen  # the whole-request deadline
    assert env.status()["www"]["version"] == 1  # served after the attack too
    print(f"F7: baseline {baseline} threads, peak {peak}; attacker saw {seen}")


FORGED = "2026-12-03 03:00:00,000 INFO certd.audit: audit_record seq=999 hash=" + "f" * 64


@pytest.mark.parametrize("reason", [f"routine\n{FORGED}", "\x1b[2K\x1b[1Aok", "x" * 501])
def test_f9_a_reason_that_forges_a_log_line_or_hides_rows_is_refused(
        attacker: UnprivUser, daemon: tuple[CertdEnv, ManagedProcess], reason: str) -> None:
    """A newline in --reason forged an `audit_record seq=... hash=...` line (the audit chain's
    external anchor) in the daemon's log; ESC codes reached terminals. Now: 400 with one
    actionable line, nothing renewed, and no forged line in the log."""
    env, proc = daemon
    seen = _attack(attacker, "f9", str(env.socket), json.dumps(reason))
    assert seen["status"].startswith("HTTP/1.0 400"), seen
    error = json.loads(seen["body"])["error"]
    assert "reason" in error and ("control character" in error or "at most 500" in error), error
    log = proc.log_text()
    assert not any(line.startswith(FORGED[:40]) for line in log.splitlines()), log
    assert "\x1b" not in log
    assert "renewal_requested" not in log


def test_f9_history_shows_control_characters_escaped(
        attacker: UnprivUser, daemon: tuple[CertdEnv, ManagedProcess]) -> None:
    """A record holding a newline and ESC codes (written before reasons were checked, or an
    error text from outside) prints as one escaped row: no forged row, no terminal codes. The
    audit log itself keeps the text as given."""
    env, proc = daemon
    proc.stop(timeout=30)
    text = f"drill\n{FORGED}\x1b[2K"
    open_for(env.state_dir).append(LifecycleEvent("forced", "www", datetime.now(timezone.utc),
                                                   initiator="uid=0(root)", reason=text))
    r = env.run("history", "www", check=0)
    assert "\x1b" not in r.stdout
    rows = [line for line in r.stdout.splitlines() if "forced" in line]
    assert len(rows) == 1 and "drill\\n2026-12-03" in rows[0] and "\\x1b[2K" in rows[0], r.stdout
    assert not any(line.startswith(FORGED[:20]) for line in r.stdout.splitlines())
    records = json.loads(env.run("history", "www", "--json", check=0).stdout)["records"]
    assert [x["reason"] for x in records if x["event"] == "forced"] == [text]
