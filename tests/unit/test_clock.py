"""certd.core.clock: FakeClock's waits, which let tests move waiting threads without sleeping."""

from __future__ import annotations

import threading

import pytest

from certd.core.clock import FakeClock, SystemClock, wait_for


def _waiting_thread(clock: FakeClock, cond: threading.Condition, timeout: float | None,
                    results: list[bool]) -> threading.Thread:
    def run() -> None:
        with cond:
            results.append(clock.wait(cond, timeout))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_wait_ends_exactly_when_fake_time_reaches_its_timeout() -> None:
    """advance() short of the timeout wakes the waiter early (True); reaching it ends the wait (False)."""
    clock, cond, results = FakeClock(), threading.Condition(), []
    start = clock.monotonic()
    thread = _waiting_thread(clock, cond, 5.0, results)
    clock.until_waiting()
    assert clock.wakeups() == [start + 5.0]
    clock.advance(4.999)
    thread.join(10)
    assert results == [True]          # woken early, like a spurious wakeup: not timed out
    thread = _waiting_thread(clock, cond, 0.001, results)
    clock.until_waiting()
    clock.advance(0.001)
    thread.join(10)
    assert results == [True, False]


def test_a_real_notify_ends_a_fake_wait() -> None:
    """notify() wakes a thread waiting on the fake clock, without any time passing."""
    clock, cond, results = FakeClock(), threading.Condition(), []
    thread = _waiting_thread(clock, cond, None, results)
    clock.until_waiting()
    with cond:
        cond.notify_all()
    thread.join(10)
    assert results == [True] and clock.wakeups() == []


def test_wait_for_counts_the_timeout_across_early_wakeups() -> None:
    """wait_for gives up when the whole timeout has passed on the clock, whatever woke it meanwhile."""
    clock, cond, results = FakeClock(), threading.Condition(), []

    def run() -> None:
        with cond:
            results.append(wait_for(clock, cond, lambda: False, 3.0))
    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(2):
        clock.until_waiting()   # advance() forgets the waiters it woke: this waits for the next wait
        clock.advance(1.0)
    clock.until_waiting()
    assert results == []
    clock.advance(1.0)
    thread.join(10)
    assert results == [False]


def test_until_waiting_gives_up_when_nobody_waits() -> None:
    """A test waiting for a thread that never waits fails with a message instead of hanging."""
    with pytest.raises(AssertionError, match="fewer than 1 thread"):
        FakeClock().until_waiting(timeout=0.0)


def test_system_clock_wait_times_out_with_false() -> None:
    """On the system clock a wait that nobody ends returns False after its timeout."""
    cond = threading.Condition()
    with cond:
        assert SystemClock().wait(cond, 0.0) is False
        assert wait_for(SystemClock(), cond, lambda: True, 0.0) is True
