"""The only module that reads the time.

Everything else takes a :class:`Clock`, so tests drive time with :class:`FakeClock` and
assert exact instants without sleeping. All datetimes are timezone-aware UTC. The few
exceptions read real time on purpose, each with its reason beside it: timeouts of real
processes and sockets (certd/reload/command.py, the control socket's watchdog in
certd/daemon/control.py), the tls-alpn-01 certificate's validity (certd/acme/responders.py),
and APScheduler's own clock for housekeeping intervals (certd/daemon/scheduler.py).

Threads that wait for each other *and* for time (the scheduler's timer, a flight's
followers, the nginx gate) wait through :meth:`Clock.wait` on their
``threading.Condition``: on the system clock that is ``Condition.wait``; on a
:class:`FakeClock` the wait ends when the fake time passes its timeout (``advance`` wakes
every waiter), so a test moves a waiting thread forward without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Protocol, overload

#: Real seconds FakeClock.until_waiting gives threads to reach their wait (a test's safety net).
SETTLE_TIMEOUT = 10.0


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock, for deadlines."""

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds`` (a fake clock just advances)."""

    def wait(self, cond: threading.Condition, timeout: float | None) -> bool:
        """``cond.wait(timeout)`` with ``timeout`` measured on this clock; the caller holds
        ``cond``. False when the timeout passed; True when notified — or woken early, as
        ``Condition.wait`` may be: callers re-check what they wait for (see :func:`wait_for`)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def wait(self, cond: threading.Condition, timeout: float | None) -> bool:
        return cond.wait(None if timeout is None else max(0.0, timeout))


def wait_for(clock: Clock, cond: threading.Condition, predicate: Callable[[], bool],
             timeout: float | None) -> bool:
    """``cond.wait_for(predicate, timeout)`` on ``clock``: the predicate's last value (True
    once it holds; False when ``timeout`` seconds of ``clock`` passed first). The caller
    holds ``cond``."""
    deadline = None if timeout is None else clock.monotonic() + timeout
    result = predicate()
    while not result:
        if deadline is None:
            clock.wait(cond, None)
        else:
            left = deadline - clock.monotonic()
            if left <= 0:
                break
            clock.wait(cond, left)
        result = predicate()
    return result


class _Waiter:
    __slots__ = ("cond", "deadline", "seq")

    def __init__(self, cond: threading.Condition, deadline: timedelta | None, seq: int) -> None:
        self.cond, self.deadline, self.seq = cond, deadline, seq


class FakeClock:
    """A clock that moves only when told to (``advance``) or when slept on.

    Threads blocked in :meth:`wait` are woken by every :meth:`advance` (their wait ends
    with False once its timeout has passed in fake time). A test that drives such a thread
    advances only while the thread waits: :meth:`until_waiting` blocks (in real time, with
    a deadline) until it does.

    Time is kept as whole microseconds elapsed (a ``timedelta``), so a wait of 0.2 s after
    advances of 0.199 s and 0.001 s ends exactly, without floating-point drift.
    """

    MONOTONIC_START = 1000.0

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
        if self._start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._elapsed = timedelta(0)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)   # a waiter came or went
        self._waiters: set[_Waiter] = set()
        self._waits = 0                                  # wait() calls begun so far

    def now(self) -> datetime:
        with self._lock:
            return self._start + self._elapsed

    def monotonic(self) -> float:
        with self._lock:
            return self.MONOTONIC_START + self._elapsed.total_seconds()

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float | timedelta) -> None:
        """Move both clocks forward and wake every thread blocked in :meth:`wait`."""
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=float(seconds))
        with self._lock:
            self._elapsed += delta
            woken, self._waiters = self._waiters, set()   # they wait again, if at all, anew
            self._changed.notify_all()
        for cond in {w.cond for w in woken}:
            with cond:  # a waiter releases cond while it waits: this cannot miss it
                cond.notify_all()

    def wait(self, cond: threading.Condition, timeout: float | None) -> bool:
        with self._lock:
            if timeout is not None and timeout <= 0:
                return False
            self._waits += 1
            waiter = _Waiter(cond, None if timeout is None else self._elapsed + timedelta(seconds=timeout),
                             self._waits)
            self._waiters.add(waiter)
            self._changed.notify_all()
        try:
            cond.wait()  # the real notify, or advance() (which also ends a fake timeout)
        finally:
            with self._lock:
                self._waiters.discard(waiter)
                self._changed.notify_all()
                timed_out = waiter.deadline is not None and self._elapsed >= waiter.deadline
        return not timed_out

    def waits(self) -> int:
        """How many :meth:`wait` calls have begun so far (for :meth:`until_waiting`'s ``since``)."""
        with self._lock:
            return self._waits

    def wakeups(self) -> list[float | None]:
        """When (monotonic; None: no timeout) each thread blocked in :meth:`wait` now times out."""
        with self._lock:
            ends = sorted((w.deadline for w in self._waiters), key=lambda d: (d is None, d or timedelta(0)))
            return [None if d is None else self.MONOTONIC_START + d.total_seconds() for d in ends]

    def until_waiting(self, count: int = 1, *, since: int = 0, timeout: float = SETTLE_TIMEOUT) -> None:
        """Block until ``count`` threads are blocked in :meth:`wait` calls begun after the
        ``since``-th (see :meth:`waits`); AssertionError after ``timeout`` real seconds. Real
        time here: it waits for real threads to get somewhere."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for w in self._waiters if w.seq > since) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fewer than {count} thread(s) waiting on the fake clock "
                                         f"after {timeout:g} s")
                self._changed.wait(left)


def utc(dt: datetime) -> datetime:
    """Return ``dt`` as aware UTC; a naive value is taken to be UTC already."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


@overload
def isoformat(dt: datetime) -> str: ...
@overload
def isoformat(dt: None) -> None: ...
@overload
def isoformat(dt: datetime | None) -> str | None: ...


def isoformat(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, second precision; None stays None."""
    if dt is None:
        return None
    return utc(dt).replace(microsecond=0).isoformat().replace("+00:00", "Z")
