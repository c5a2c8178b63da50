"""The daemon's jobs in the worker pool: a certificate's scheduled look, a flight (renew,
roll back, revoke) run to its end with whatever joined it, and the CA probe.

A flight is one certificate's operation in progress (:class:`~certd.daemon.scheduler.Flights`):
a scheduled look that finds nothing due but was joined by a forced renewal runs that renewal
next; whatever the end, the certificate is tidied up, rescheduled from the store, and its
failing state noted for systemd's STATUS= line.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any, Callable


from certd.config import Config
from certd.core.clock import Clock
from certd.core import failover
from certd.core.errors import CertdError, UsageError
from certd.daemon.scheduler import Flight, Flights, Scheduler, ShuttingDown
from certd.daemon.systemd import StateTracker
from certd.engine.manager import Manager
from certd.engine.outcome import Outcome, Result
from certd.engine.planning import ARI_POLL
from certd.ops.log import event
from certd.store import housekeeping

log = logging.getLogger("certd.daemon")

STORE_DOWN_RETRY = 30.0  # seconds: a scheduled look put off while the fleet's database is down
ARI_START_RATE = 10.0    # ARI polls a second, at most, for those due when the daemon starts


class Jobs:
    """The job functions the scheduler runs, over the daemon's manager, flights and scheduler."""

    def __init__(self, config: Callable[[], Config], manager: Manager, flights: Flights,
                 scheduler: Scheduler, tracker: StateTracker, stop: threading.Event) -> None:
        self._config, self.manager, self.flights = config, manager, flights
        self.scheduler, self.tracker, self._stop = scheduler, tracker, stop
        #: [cluster]: the store probe's verdict (storehealth); a scheduled look is skipped while False
        self.store_up: Callable[[], bool] = lambda: True
        self._skipping = False  # "skipped: database unreachable" said once per outage

    def housekeep(self, names: list[str] | None = None) -> None:
        """Remove what killed processes left (certd/store/housekeeping.py): all at start, then per rotation."""
        if names is None:  # first: a stop during the sweep below must not put off the keys' destruction
            self.destroy_retired()
        try:
            housekeeping.sweep(self._config(), names, stop=self._stop)
        except Exception:  # tidying up must never stop the daemon
            log.exception("housekeeping failed")

    def destroy_retired(self) -> None:
        """Destroy keys retired for longer than their ``destroy_after`` (certd.engine.destruction):
        at start and every :func:`~certd.engine.destruction.pass_interval`; each commit runs it too."""
        try:
            self.manager.destroy_retired()
        except Exception:  # never stop the daemon; the next pass tries again
            log.exception("key destruction pass failed")

    def recheck_facts(self) -> None:
        """Every RECHECK_INTERVAL: find what changed in the store behind the daemon's back (a
        hand edit), so that status listings, which trust the daemon's own writes, show it."""
        try:
            self.manager.recheck(list(self._config().certificates))
        except Exception:  # never stop the daemon; the next pass tries again
            log.exception("status recheck failed")

    def reschedule(self, name: str, spread: Spread | None = None) -> None:
        """Schedule ``name``'s next look from the store (nothing if it is no longer configured)."""
        try:
            cert = self._config().certificate(name)
        except KeyError:
            return
        when, reason = self.manager.plan(cert)
        if spread is not None and reason == ARI_POLL:
            when = spread.slot(when)
        self.scheduler.schedule(name, when, reason)

    def scheduled(self, name: str) -> None:
        """The scheduler's job for ``name``: renew if due, unless an operation already runs. While
        the store probe says the fleet's database is down, the look is put off by
        :data:`STORE_DOWN_RETRY` (no order is placed; the store would fail it after its pool wait)."""
        if not self.store_up():
            if not self._skipping:
                self._skipping = True
                event(log, "scheduled_renewals_skipped", logging.WARNING, name=name,
                      why="the fleet database is unreachable: no order until it is back",
                      retry_seconds=STORE_DOWN_RETRY)
            self.scheduler.schedule(name, self.scheduler.clock.now() + timedelta(seconds=STORE_DOWN_RETRY),
                                    "database unreachable")
            return
        if self._skipping:
            self._skipping = False
            event(log, "scheduled_renewals_resumed", name=name)
        try:
            flight, started = self.flights.begin(name, "scheduled")
        except ShuttingDown:
            return
        if not started:
            return  # a forced renewal or rollback is running; it reschedules when done
        self.run_flight(flight, "renew", force=False, reason="", initiator="scheduler")

    def run_flight(self, flight: Flight, kind: str, **kw: Any) -> None:
        """Run ``flight`` (and a forced renewal that joined it) to its end, then reschedule."""
        outcome: Outcome | None = None
        ended = False
        try:
            while not ended:
                outcome = self._fly(flight, kind, kw)
                forced = self.flights.end(flight, outcome, renewed=outcome.result != Result.NOT_DUE,
                                          not_run=_not_run)
                ended = forced is None
                if forced is not None:  # a forced renewal joined this unforced one, which renewed nothing
                    flight.say(f"{outcome.message}; now the forced renewal asked for meanwhile")
                    kind, kw = "renew", forced
        finally:
            if not ended:  # interrupted by what _fly does not catch (KeyboardInterrupt)
                self.flights.end(flight, outcome)
            if not self._stop.is_set():
                self.housekeep([flight.name])
                self.reschedule(flight.name)
                self.tracker.note(flight.name)
                self.tracker.update()
        final = flight.result if flight.done else outcome  # what its followers were told
        if final is not None and not final.ok:
            event(log, "rotation_outcome", logging.WARNING, name=flight.name, result=final.result.value,
                  message=final.message)

    def _fly(self, flight: Flight, kind: str, kw: dict[str, Any]) -> Outcome:
        """Run one ``kind`` operation of ``flight``; every failure becomes its outcome."""
        try:
            cert = self._config().certificate(flight.name)
            progress = lambda _n, m: flight.say(m)  # noqa: E731
            if kind == "renew":
                return self.manager.renew_one(cert, progress=progress, **kw)
            if kind == "revoke":
                return self.manager.revoke(cert, progress=progress, **kw)
            return self.manager.rollback(cert, progress=progress, **kw)
        except UsageError as e:
            return Outcome(flight.name, Result.REFUSED, str(e))
        except KeyError:
            return Outcome(flight.name, Result.FAILED, f"{flight.name} is no longer configured")
        except Exception as e:  # never let a bug kill the worker silently
            log.exception("rotation of %s crashed", flight.name)
            return Outcome(flight.name, Result.FAILED, f"internal error: {type(e).__name__}: {e}")

    def probe_ca(self) -> None:
        """While certificates wait out a backoff because the CA was unreachable, ask the CA's
        directory (one cheap GET) every ``ca_probe_interval``; once it answers, retry them now
        instead of at the end of their backoff (no day-long stuck backoff after an outage)."""
        names = self.tracker.ca_waiting()
        config = self._config()
        waiting = [c for c in config.certificates if c.name in names]
        # several CAs: any of theirs the renewal would order from answering is worth a retry
        now = self.manager.ports.clock.now()
        wanted = {name for c in waiting
                  for name in failover.worth_probing([ca.name for ca in config.cas_for(c)], self._waits(c.name), now)}
        if not waiting or not any(self.manager.ports.issuer_at(ca.name).reachable()
                                  for ca in config.cas if ca.name in wanted):
            return
        event(log, "ca_reachable_again", names=",".join(c.name for c in waiting))
        for cert in waiting:
            try:
                flight, started = self.flights.begin(cert.name, "scheduled")
            except ShuttingDown:
                return
            if started:
                self.scheduler.submit(self.run_flight, flight, "renew", job_id=f"run:{cert.name}", force=False,
                                      reason="", initiator="scheduler", skip_backoff=True)

    def _waits(self, name: str) -> dict[str, Any] | None:
        """The certificate's per-CA waits (none when its state cannot be read: every CA probed)."""
        try:
            return self.manager.load_state(name).ca_waits
        except CertdError:
            return None


class Spread:
    """Start-up slots for ARI polls that are due at once, ``rate`` a second: a restart with
    thousands of certificates would otherwise ask the CA about every one of them in the same
    second (RFC 9773 leaves the polling pace to the client). A certificate whose renewal is
    due is not delayed: only plan()'s ARI_POLL times get a slot."""

    def __init__(self, clock: Clock, rate: float) -> None:
        self.clock, self.next, self.step = clock, clock.now(), timedelta(seconds=1 / rate)

    def slot(self, when: datetime) -> datetime:
        now = self.clock.now()
        if when > now:
            return when
        when, self.next = max(self.next, now), max(self.next, now) + self.step
        return when



def _not_run(outcome: Outcome) -> Outcome:
    """How a flight ends whose forced renewal, waiting behind a check, is not started (stopping)."""
    return Outcome(outcome.name, Result.FAILED, f"{outcome.message}; the forced renewal asked for meanwhile did "
                   "not run: certd is shutting down; ask again once it is back")
