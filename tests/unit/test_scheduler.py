"""The certificate timer of certd.daemon.scheduler.Scheduler, on a fake clock: order, exact
times, reschedules, unschedules."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from certd.core.clock import FakeClock
from certd.daemon.scheduler import MAX_SLEEP, Scheduler

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)
MS = timedelta(milliseconds=1)


class Timer:
    """A Scheduler on a FakeClock whose jobs report (name, fake time) when they run."""

    def __init__(self) -> None:
        self.clock = FakeClock(NOW)
        self.ran: queue.Queue[tuple[str, datetime]] = queue.Queue()
        self.sched = Scheduler(2, lambda name: self.ran.put((name, self.clock.now())), self.clock)

    def next_run(self) -> tuple[str, datetime]:
        """The next job to run in the worker pool (a real-time deadline: the pool is real threads)."""
        return self.ran.get(timeout=10)

    def advance(self, delta: timedelta) -> None:
        """Move the clock while the timer waits, and return once it waits again."""
        self.clock.advance(delta)
        self.clock.until_waiting()


@pytest.fixture
def timer() -> Iterator[Timer]:
    t = Timer()
    yield t
    # APScheduler drops a one-off job only after handing it to the pool; shutting down in
    # between makes its thread raise JobLookupError. Poll (real time, with a deadline) until
    # it has dropped them all.
    deadline = time.monotonic() + 10
    while t.sched._aps.get_jobs() and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    t.sched.shutdown()


def test_jobs_run_in_time_order_and_only_at_their_latest_time(timer: Timer) -> None:
    """A rescheduled certificate runs once, at its new time; an unscheduled one never runs."""
    sched = timer.sched
    sched.schedule("later", NOW + timedelta(hours=1), "r")
    sched.schedule("b", NOW + 200 * MS, "r")
    sched.schedule("c", NOW + timedelta(hours=2), "r")
    sched.schedule("c", NOW + 300 * MS, "r")      # moved earlier
    sched.schedule("a", NOW - timedelta(seconds=5), "r")   # overdue: runs at once
    sched.schedule("gone", NOW + 100 * MS, "r")
    sched.unschedule("gone")
    assert sched.next_scheduled() == (NOW, "a")           # the past is clamped to now
    sched.start()
    timer.clock.until_waiting()
    assert timer.next_run() == ("a", NOW)
    start = timer.clock.monotonic()
    assert timer.clock.wakeups() == [start + 0.1]   # gone's stale heap entry: woken, skipped
    timer.advance(100 * MS)
    assert timer.ran.empty() and timer.clock.wakeups() == [start + 0.2]   # until b exactly
    timer.advance(99 * MS)
    assert timer.ran.empty()
    timer.advance(1 * MS)
    assert timer.next_run() == ("b", NOW + 200 * MS)
    timer.advance(100 * MS)
    assert timer.next_run() == ("c", NOW + 300 * MS)
    timer.advance(timedelta(minutes=30))                  # "gone" never comes, nor "c" at 2 h
    assert timer.ran.empty()
    assert sched.scheduled_names() == ["later"] and "c" not in sched.next_runs()
    assert sched.next_scheduled() == (NOW + timedelta(hours=1), "later")
    assert sched.running


def test_a_schedule_earlier_than_the_timer_waits_for_wakes_it(timer: Timer) -> None:
    """Scheduling something sooner than the next entry is noticed at once, not at that entry's time."""
    timer.sched.schedule("far", NOW + timedelta(hours=1), "r")
    timer.sched.start()
    timer.clock.until_waiting()
    since = timer.clock.waits()
    timer.sched.schedule("soon", NOW + 50 * MS, "r")
    timer.clock.until_waiting(since=since)
    assert timer.clock.wakeups() == [timer.clock.monotonic() + 0.05]
    timer.advance(50 * MS)
    assert timer.next_run() == ("soon", NOW + 50 * MS)


def test_the_timer_looks_at_least_once_a_minute(timer: Timer) -> None:
    """With nothing due for an hour the timer still wakes every MAX_SLEEP (a clock set forward is noticed)."""
    timer.sched.schedule("far", NOW + timedelta(hours=1), "r")
    timer.sched.start()
    timer.clock.until_waiting()
    assert timer.clock.wakeups() == [timer.clock.monotonic() + MAX_SLEEP]
    timer.advance(timedelta(seconds=MAX_SLEEP))
    assert timer.clock.wakeups() == [timer.clock.monotonic() + MAX_SLEEP] and timer.ran.empty()
