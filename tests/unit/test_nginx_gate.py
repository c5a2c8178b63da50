"""reload.nginx.NginxGate on a fake clock: deploy switches never overlap nginx reading its
certificates, one reload serves every rotation whose switch came before it started, and waiting
for a turn ends exactly at the hook's deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable

from certd.core.clock import FakeClock
from certd.reload.command import HookResult
from certd.reload.nginx import NginxGate

TIMEOUT = 5.0


def ok_reload(log: list[str], what: str) -> Callable[[], HookResult]:
    def run() -> HookResult:
        log.append(f"{what} start")
        log.append(f"{what} end")
        return HookResult("nginx", True, 0, 0.0, "")
    return run


def blocking_reload(log: list[str], started: threading.Event, release: threading.Event) -> Callable[[], HookResult]:
    """A reload that holds the gate until the test releases it."""
    def run() -> HookResult:
        log.append("reload start")
        started.set()
        assert release.wait(10), "the test never released the reload"
        log.append("reload end")
        return HookResult("nginx", True, 0, 0.0, "")
    return run


def reload(gate: NginxGate, clock: FakeClock, name: str, run: Callable[[], HookResult],
           timeout: float = TIMEOUT) -> HookResult:
    return gate.reload(name, clock.monotonic() + timeout, run, clock)


def test_a_reload_after_a_switch_serves_every_certificate_switched_before_it() -> None:
    """Two certificates switch, one reload runs; the other's hook finds it already reloaded."""
    gate, clock, log = NginxGate(), FakeClock(), []
    for name in ("a", "b"):
        with gate.switch(name):
            pass
    assert reload(gate, clock, "a", ok_reload(log, "reload-a")).ok
    covered = reload(gate, clock, "b", ok_reload(log, "reload-b"))
    assert covered.ok and "already reloaded" in covered.output
    assert log == ["reload-a start", "reload-a end"]


def test_a_switch_after_the_reload_started_needs_a_reload_of_its_own() -> None:
    """A switch made after a reload began is not covered by it."""
    gate, clock, log = NginxGate(), FakeClock(), []
    with gate.switch("a"):
        pass
    reload(gate, clock, "a", ok_reload(log, "first"))
    with gate.switch("a"):
        pass
    reload(gate, clock, "a", ok_reload(log, "second"))
    assert log == ["first start", "first end", "second start", "second end"]


def test_a_failed_reload_covers_nothing() -> None:
    """When nginx refused the reload, the next hook reloads again."""
    gate, clock, log = NginxGate(), FakeClock(), []
    with gate.switch("a"):
        pass
    assert not reload(gate, clock, "a", lambda: HookResult("nginx", False, 1, 0.0, "emerg")).ok
    reload(gate, clock, "a", ok_reload(log, "again"))
    assert log == ["again start", "again end"]


def test_switches_wait_while_nginx_reads_its_certificates() -> None:
    """A switch that arrives during a reload happens only after the reload finished."""
    gate, clock, log = NginxGate(), FakeClock(), []
    started, release = threading.Event(), threading.Event()
    with gate.switch("a"):
        pass
    reader = threading.Thread(target=reload, args=(gate, clock, "a", blocking_reload(log, started, release)))
    reader.start()
    assert started.wait(10)

    def switch_b() -> None:
        with gate.switch("b"):
            log.append("switch b")

    switcher = threading.Thread(target=switch_b)
    switcher.start()
    with gate.cond:  # the switch announces itself (notify) before it waits for the reload
        assert gate.cond.wait_for(lambda: gate.waiting == 1, timeout=10)
    assert log == ["reload start"]
    release.set()
    reader.join(10)
    switcher.join(10)
    assert log == ["reload start", "reload end", "switch b"]


def test_after_a_restart_the_first_reload_covers_switches_made_before_it() -> None:
    """Rotations resumed after a crash (their switches unknown to this process) share the first reload."""
    gate, clock, log = NginxGate(), FakeClock(), []
    reload(gate, clock, "a", ok_reload(log, "first"))
    assert "already reloaded" in reload(gate, clock, "b", ok_reload(log, "second")).output
    assert log == ["first start", "first end"]


def test_waiting_for_a_reload_gives_up_exactly_at_the_hook_deadline() -> None:
    """A reload stuck in another thread makes the next hook fail at its own deadline, not hang."""
    gate, clock, log = NginxGate(), FakeClock(), []
    started, release = threading.Event(), threading.Event()
    with gate.switch("a"):
        pass
    stuck = threading.Thread(target=reload, args=(gate, clock, "a", blocking_reload(log, started, release)))
    stuck.start()
    assert started.wait(10)
    results: list[HookResult] = []
    second = threading.Thread(target=lambda: results.append(
        reload(gate, clock, "b", ok_reload(log, "second"), timeout=0.2)))
    second.start()
    clock.until_waiting()
    clock.advance(0.199)
    clock.until_waiting()            # still waiting its turn 1 ms before its deadline
    assert results == []
    clock.advance(0.001)
    second.join(10)
    assert len(results) == 1 and not results[0].ok and results[0].timed_out
    assert "did not finish before this hook's timeout" in results[0].output
    release.set()
    stuck.join(10)
    assert log == ["reload start", "reload end"]


def test_a_hook_whose_switch_a_finished_reload_covered_does_not_wait_for_later_switches() -> None:
    """A reload that started after ``a``'s switch ends while another certificate switches: ``a``'s
    hook is done at once. It used to wait for a moment with no switch at all, which a wave of
    renewals and fleet applies (32 threads switching and reloading one nginx) did not give for
    20 s (the fleet soak: applies served by nginx, still waiting in their reload hook)."""
    gate, clock, log = NginxGate(), FakeClock(), []
    started, release, in_b, hold_b = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    with gate.switch("a"):
        pass
    first = threading.Thread(target=reload, args=(gate, clock, "x", blocking_reload(log, started, release)))
    first.start()
    assert started.wait(10)
    results: list[HookResult] = []
    a = threading.Thread(target=lambda: results.append(reload(gate, clock, "a", ok_reload(log, "a's own"))))
    a.start()
    clock.until_waiting()  # a's hook waits for the reload that reads a's switch

    def switch_b() -> None:
        with gate.switch("b"):
            in_b.set()
            assert hold_b.wait(30)
    b = threading.Thread(target=switch_b)
    b.start()
    with gate.cond:
        assert gate.cond.wait_for(lambda: gate.waiting == 1, 10)
    release.set()
    first.join(10)
    assert in_b.wait(10)  # b switches now, and stays in its switch
    a.join(10)
    try:
        assert len(results) == 1 and results[0].ok and "already reloaded" in results[0].output
    finally:
        hold_b.set()
        clock.advance(TIMEOUT)
        a.join(10)
        b.join(10)
    assert log == ["reload start", "reload end"]
