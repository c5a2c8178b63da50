"""The certificate timer of certd.daemon.scheduler.Scheduler: order, reschedules, unschedules."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

from certd.core.clock import SystemClock
from certd.daemon.scheduler import Scheduler


def make(expected: int) -> tuple[Scheduler, list[str], threading.Event]:
    ran: list[str] = []
    done = threading.Event()

    def run(name: str) -> None:
        ran.append(name)
        if len(ran) >= expected:
            done.set()
    return Scheduler(2, run, SystemClock()), ran, done


def test_jobs_run_in_time_order_and_only_at_their_latest_time():
    """A rescheduled certificate runs once, at its new time; an unscheduled one never runs."""
    sched, ran, done = make(3)
    now = datetime.now(timezone.utc)
    sched.schedule("later", now + timedelta(hours=1), "r")
    sched.schedule("b", now + timedelta(milliseconds=200), "r")
    sched.schedule("c", now + timedelta(hours=2), "r")
    sched.schedule("c", now + timedelta(milliseconds=300), "r")      # moved earlier
    sched.schedule("a", now - timedelta(seconds=5), "r")              # overdue: runs at once
    sched.schedule("gone", now + timedelta(milliseconds=100), "r")
    sched.unschedule("gone")
    assert sched.next_scheduled() is not None and sched.next_scheduled()[1] == "a"
    sched.start()
    try:
        assert done.wait(10)
        time.sleep(0.2)
        assert ran == ["a", "b", "c"]
        assert sched.scheduled_names() == ["later"] and "c" not in sched.next_runs()
        assert sched.next_scheduled() == (now + timedelta(hours=1), "later")
        assert sched.running
    finally:
        sched.shutdown()


def test_a_schedule_earlier_than_the_timer_waits_for_wakes_it():
    """Scheduling something sooner than the next entry is noticed at once, not at that entry's time."""
    sched, ran, done = make(1)
    now = datetime.now(timezone.utc)
    sched.schedule("far", now + timedelta(hours=1), "r")
    sched.start()
    try:
        time.sleep(0.1)
        sched.schedule("soon", datetime.now(timezone.utc) + timedelta(milliseconds=50), "r")
        assert done.wait(5) and ran == ["soon"]
    finally:
        sched.shutdown()
