"""Scheduling and single-flight: when each certificate's job runs, and one rotation per
certificate at a time.

Every certificate has one scheduled time, the earlier of its renewal time (from
:mod:`certd.core.policy`) and its next ARI poll; when it comes, its job runs
:meth:`Manager.renew_one` (which only renews when due) and then sets the next time from the
fresh facts. All rotations — scheduled, forced through the control socket, rollbacks — run in
APScheduler's bounded thread pool.

:class:`Flights` makes a certificate's work single-flight within the daemon: a forced renewal
that arrives while a scheduled one runs *joins* it (streaming its progress) instead of placing
a second order — and when that one finds nothing due, the forced renewal runs right after it
in the same flight; across processes the store's per-certificate lock does the same job.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from certd.core.clock import Clock, isoformat, wait_for
from certd.ops.log import event

log = logging.getLogger("certd.scheduler")

MAX_SLEEP = 60.0  # seconds the certificate timer sleeps at most (see Scheduler._due_loop)


@dataclass
class Flight:
    """One unit of work on one certificate, with its progress for anyone who joins."""

    name: str
    kind: str
    clock: Clock   # what follow()'s timeout is measured on
    events: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    done: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    #: a forced renewal asked for while an unforced one ran: its arguments (see Flights.end)
    forced_next: dict[str, Any] | None = None

    def say(self, message: str) -> None:
        with self.cond:
            self.events.append({"name": self.name, "message": message})
            self.cond.notify_all()

    def finish(self, result: Any) -> None:
        with self.cond:
            self.result, self.done = result, True
            self.cond.notify_all()

    def finished(self) -> bool:
        return self.done

    def _news_after(self, seen: int) -> bool:
        """More than ``seen`` events, or done (the caller holds ``cond``)."""
        return seen < len(self.events) or self.done

    def follow(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield progress events as they happen until the flight is done, or until nothing
        happened for ``timeout`` seconds (on the flight's clock)."""
        i = 0
        while True:
            with self.cond:
                if not wait_for(self.clock, self.cond, functools.partial(self._news_after, i), timeout):
                    return
                batch, i = self.events[i:], len(self.events)
                done = self.done
            yield from batch
            if done and i >= len(self.events):
                return


class Flights:
    """At most one :class:`Flight` per certificate name."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self.accepting = True

    def begin(self, name: str, kind: str, *, forced: dict[str, Any] | None = None) -> tuple[Flight, bool]:
        """Return ``(flight, started)``: a new flight (started=True) or the one in progress.

        ``forced`` (a forced renewal's arguments) joining an unforced renewal is remembered on
        it: should that one find nothing due, :meth:`end` hands it back to be run next."""
        with self._lock:
            current = self._flights.get(name)
            if current is not None:
                if forced is not None and current.kind in UNFORCED and current.forced_next is None:
                    current.forced_next = forced
                return current, False
            if not self.accepting:
                raise ShuttingDown("certd is shutting down; no new work is accepted")
            flight = Flight(name, kind, self.clock)
            self._flights[name] = flight
            return flight, True

    def end(self, flight: Flight, result: Any, *, renewed: bool = True,
            not_run: Callable[[Any], Any] | None = None) -> dict[str, Any] | None:
        """End ``flight`` with ``result`` — unless it did not renew (``renewed`` false) and a
        forced renewal joined it: then the flight goes on as that one, whose arguments are
        returned. Deciding under the lock that :meth:`begin` takes means no forced request can
        join in between and be lost. Once shutting down, that forced renewal is not started:
        the flight ends with ``not_run(result)`` instead (if given), so whoever asked is told
        (every follower of the flight gets that answer)."""
        with self._lock:
            if not renewed and flight.forced_next is not None:
                if self.accepting:
                    forced, flight.forced_next, flight.kind = flight.forced_next, None, "forced"
                    return forced
                flight.forced_next = None
                if not_run is not None:
                    result = not_run(result)
            if self._flights.get(flight.name) is flight:
                del self._flights[flight.name]
        flight.finish(result)
        return None

    def in_progress(self) -> list[Flight]:
        with self._lock:
            return list(self._flights.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every flight in progress now is done; False once ``timeout`` seconds
        (on the clock) passed first."""
        deadline = self.clock.monotonic() + timeout
        for flight in self.in_progress():
            with flight.cond:
                left = deadline - self.clock.monotonic()
                if not wait_for(self.clock, flight.cond, flight.finished, max(0.0, left)):
                    return False
        return True


#: flight kinds that renew only when due (a forced renewal joining one may still have to run)
UNFORCED = ("scheduled", "requested")


class ShuttingDown(Exception):
    pass


class Scheduler:
    """When each certificate's job runs (a heap and one timer thread), and APScheduler's bounded
    worker pool that runs it, and every other job (forced renewals, rollbacks, housekeeping).

    The certificates are not one APScheduler job each: at 10,000 certificates a job cost
    ~0.2 ms to add (APScheduler inspects the callable's signature every time: 2 s of the
    daemon's start-up) and ~0.7 KB to keep. Here a certificate is a dict entry and a heap
    entry; a reschedule leaves the old heap entry behind, skipped when it comes up.
    """

    def __init__(self, workers: int, run_job: Callable[[str], None], clock: Clock) -> None:
        self.clock = clock
        self._run_job = run_job
        self._aps = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            # Single-flight is Flights' job. APScheduler's own instance limit would *skip* the run
            # a job schedules for itself while it is still finishing, and a DateTrigger job that
            # is skipped is gone: the certificate would never be looked at again.
            job_defaults={"coalesce": True, "max_instances": 8, "misfire_grace_time": None},
            timezone="UTC",
        )
        self._cond = threading.Condition()
        self._when: dict[str, datetime] = {}            # name -> when its job runs
        self._when_text: dict[str, str] = {}            # name -> the same as ISO 8601 text (status)
        self._heap: list[tuple[datetime, str]] = []     # (when, name); stale entries are skipped
        self._timer: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._aps.start()
        self._timer = threading.Thread(target=self._due_loop, name="certd-schedule", daemon=True)
        self._timer.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._aps.running:
            self._aps.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return bool(self._aps.running) and self._timer is not None and self._timer.is_alive()

    def schedule(self, name: str, when: datetime, reason: str) -> None:
        """(Re)schedule ``name``'s job at ``when`` (now if in the past)."""
        when = max(when, self.clock.now())
        at = isoformat(when)
        with self._cond:
            self._when[name], self._when_text[name] = when, at
            heapq.heappush(self._heap, (when, name))
            if len(self._heap) > 2 * len(self._when) + 64:  # mostly stale: rebuild
                self._heap = [(w, n) for n, w in self._when.items()]
                heapq.heapify(self._heap)
            if self._heap[0] == (when, name):
                self._cond.notify()  # earlier than what the timer waits for
        event(log, "renewal_scheduled", name=name, at=at, reason=reason)

    def _due_loop(self) -> None:
        """Hand every certificate whose time has come to the worker pool."""
        with self._cond:
            while not self._stopping:
                now = self.clock.now()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    when, name = heapq.heappop(self._heap)
                    if self._when.get(name) == when:
                        del self._when[name], self._when_text[name]
                        due.append(name)
                for name in due:
                    self.submit(self._run_job, name, job_id=f"renew:{name}")
                # Wake at least once a minute: the heap is in wall-clock time, and a clock that
                # was set forward meanwhile must not delay what is due by the size of the step.
                wait = (self._heap[0][0] - now).total_seconds() if self._heap else MAX_SLEEP
                self.clock.wait(self._cond, min(wait, MAX_SLEEP))

    def submit(self, fn: Callable[..., Any], *args: Any, job_id: str, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` in the worker pool now (forced renewals, rollbacks)."""
        # No run date: APScheduler runs the job at once by its own clock. A date from
        # self.clock (a test's fake one, possibly ahead of real time) would make it wait.
        self._aps.add_job(fn, DateTrigger(), args=list(args), kwargs=kwargs, id=job_id, replace_existing=True)

    def every(self, seconds: float, fn: Callable[[], None], *, job_id: str) -> None:
        """Run ``fn`` every ``seconds`` in the worker pool (housekeeping jobs).

        These intervals run on APScheduler's own (real) clock, not on ``self.clock``: they are
        housekeeping at a fixed pace (the CA probe, state scans), never a certificate's time."""
        self._aps.add_job(fn, IntervalTrigger(seconds=seconds), id=job_id, replace_existing=True)

    def unschedule(self, name: str) -> None:
        with self._cond:
            found = self._when.pop(name, None) is not None
            self._when_text.pop(name, None)
        if found:
            event(log, "renewal_unscheduled", name=name)

    def next_runs(self) -> dict[str, str]:
        """When each scheduled certificate's job runs next, as ISO 8601 text (a copy taken under
        one lock; formatting 10,000 datetimes per status request cost 50 ms)."""
        with self._cond:
            return dict(self._when_text)

    def scheduled_names(self) -> list[str]:
        with self._cond:
            return list(self._when)

    def next_scheduled(self) -> tuple[datetime, str] | None:
        """The earliest certificate job: (when, name); None if there is none."""
        with self._cond:
            while self._heap and self._when.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # stale
            return self._heap[0] if self._heap else None
