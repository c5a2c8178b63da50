"""hooks_nginx.NginxGate: deploy switches never overlap nginx reading its certificates, and one reload
serves every rotation whose switch came before it started."""

from __future__ import annotations

import threading
import time

from certd.reload.command import HookResult
from certd.reload.nginx import NginxGate


def ok_reload(log: list[str], what: str, seconds: float = 0.0):  # noqa: ANN201
    def run() -> HookResult:
        log.append(f"{what} start")
        time.sleep(seconds)
        log.append(f"{what} end")
        return HookResult("nginx", True, 0, seconds, "")
    return run


def test_a_reload_after_a_switch_serves_every_certificate_switched_before_it() -> None:
    """Two certificates switch, one reload runs; the other's hook finds it already reloaded."""
    gate, log = NginxGate(), []
    for name in ("a", "b"):
        with gate.switch(name):
            pass
    assert gate.reload("a", time.monotonic() + 5, ok_reload(log, "reload-a")).ok
    covered = gate.reload("b", time.monotonic() + 5, ok_reload(log, "reload-b"))
    assert covered.ok and "already reloaded" in covered.output
    assert log == ["reload-a start", "reload-a end"]


def test_a_switch_after_the_reload_started_needs_a_reload_of_its_own() -> None:
    """A switch made after a reload began is not covered by it."""
    gate, log = NginxGate(), []
    with gate.switch("a"):
        pass
    gate.reload("a", time.monotonic() + 5, ok_reload(log, "first"))
    with gate.switch("a"):
        pass
    gate.reload("a", time.monotonic() + 5, ok_reload(log, "second"))
    assert log == ["first start", "first end", "second start", "second end"]


def test_a_failed_reload_covers_nothing() -> None:
    """When nginx refused the reload, the next hook reloads again."""
    gate, log = NginxGate(), []
    with gate.switch("a"):
        pass
    assert not gate.reload("a", time.monotonic() + 5, lambda: HookResult("nginx", False, 1, 0.0, "emerg")).ok
    gate.reload("a", time.monotonic() + 5, ok_reload(log, "again"))
    assert log == ["again start", "again end"]


def test_switches_wait_while_nginx_reads_its_certificates() -> None:
    """A switch that arrives during a reload happens only after the reload finished."""
    gate, log = NginxGate(), []
    with gate.switch("a"):
        pass
    reader = threading.Thread(target=gate.reload, args=("a", time.monotonic() + 5, ok_reload(log, "reload", 0.3)))
    reader.start()
    while "reload start" not in log:
        time.sleep(0.001)

    def switch_b() -> None:
        with gate.switch("b"):
            log.append("switch b")

    switcher = threading.Thread(target=switch_b)
    switcher.start()
    reader.join()
    switcher.join()
    assert log == ["reload start", "reload end", "switch b"]


def test_after_a_restart_the_first_reload_covers_switches_made_before_it() -> None:
    """Rotations resumed after a crash (their switches unknown to this process) share the first reload."""
    gate, log = NginxGate(), []
    gate.reload("a", time.monotonic() + 5, ok_reload(log, "first"))
    assert "already reloaded" in gate.reload("b", time.monotonic() + 5, ok_reload(log, "second")).output
    assert log == ["first start", "first end"]


def test_waiting_for_a_reload_gives_up_at_the_hook_deadline() -> None:
    """A reload stuck in another thread makes the next hook fail at its own deadline, not hang."""
    gate, release = NginxGate(), threading.Event()
    with gate.switch("a"):
        pass
    stuck = threading.Thread(target=gate.reload, args=("a", time.monotonic() + 5,
                                                        lambda: (release.wait(5), HookResult("nginx", True, 0, 0, ""))[1]))
    stuck.start()
    while not gate.reading:
        time.sleep(0.001)
    started = time.monotonic()
    result = gate.reload("b", time.monotonic() + 0.2, lambda: HookResult("nginx", True, 0, 0, ""))
    assert not result.ok and result.timed_out and time.monotonic() - started < 1
    release.set()
    stuck.join()
