"""``certd run``: the composition root of the long-running service.

Start-up: load and check the config, finish rotations a crash left unfinished, schedule every
certificate, open the control socket, watch the config file, tell systemd READY=1. Then the
main thread only waits for signals: SIGHUP reloads the config (as does an edit of the file),
SIGTERM/SIGINT stop taking work, let in-flight rotations reach a safe point (committed or rolled
back) within ``SHUTDOWN_GRACE`` seconds, and exit 0. A rotation still running past that bound
is left to its journal: the next start resumes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from certd import config as config_mod
from certd.verify import drift
from certd.store import housekeeping
from certd.core.clock import Clock, SystemClock, isoformat
from certd.config import CertificateConfig, Config
from certd.daemon.control import Caller, ControlServer, Preformatted, rows_document
from certd.core.errors import CertdError, ConfigError, UsageError
from certd.ops.log import event
from certd.engine.manager import Outcome
from certd.engine.planning import ARI_POLL
from certd.daemon.monitor import Monitor
from certd.daemon.wiring import build_manager, build_sinks
from certd.daemon.scheduler import UNFORCED, Flight, Flights, Scheduler, ShuttingDown
from certd.core.textsafe import check_reason

log = logging.getLogger("certd.daemon")
_REQUESTED = {"rollback": "rollback_requested", "revoke": "revocation_requested"}  # log event per kind

SHUTDOWN_GRACE = 60.0
CONFIG_DEBOUNCE = 0.3
STATUS_INTERVAL = 5.0    # seconds between systemd STATUS= lines (each one looks at every certificate)
ARI_START_RATE = 10.0    # ARI polls a second, at most, for those due when the daemon starts


def sd_notify(message: str) -> None:
    """Send a state line to systemd (Type=notify); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)


class Daemon:
    def __init__(self, config_path: Path, *, clock: Clock | None = None) -> None:
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.config: Config = config_mod.load(config_path, check_runtime=True)
        self.sinks = build_sinks(self.config, self.clock, daemon=True)
        self.manager = build_manager(self.config, clock=self.clock, daemon=True, lock_timeout=SHUTDOWN_GRACE,
                                     sinks=self.sinks)
        self.flights = Flights(self.clock)
        self.scheduler = Scheduler(self.config.daemon.workers, self._scheduled_job, self.clock)
        self.monitor = Monitor(self.manager, lambda: self.config, clock=self.clock, metrics=self.sinks.metrics,
                               busy=lambda name: any(f.name == name for f in self.flights.in_progress()),
                               submit=self.scheduler.submit)
        self.control = ControlServer(self.config.daemon.control_socket, {
            ("GET", "/v1/status"): self._api_status,
            ("POST", "/v1/renew"): self._api_renew,
            ("POST", "/v1/rollback"): self._api_rollback,
            ("POST", "/v1/revoke"): self._api_revoke,
            ("POST", "/v1/verify"): self._api_verify,
            ("POST", "/v1/reload"): self._api_reload,
            ("GET", "/v1/drift"): self._api_drift,
            ("GET", "/v1/history"): self._api_history,
        }, group=self.config.daemon.control_group,
            mutating={"/v1/renew", "/v1/rollback", "/v1/reload", "/v1/verify", "/v1/revoke"})
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self._reload_timer: threading.Timer | None = None
        self._observer: Any = None
        self._status_lock = threading.Lock()
        self._status_timer: threading.Timer | None = None
        self._status_sent = float("-inf")
        self._failing: set[str] = set()      # certificates whose last attempt failed (STATUS=)
        self._ca_waiting: set[str] = set()   # ... because the CA was unreachable (_probe_ca)
        self._states_scanned = False         # both sets hold every certificate's state
        self._serving = False                # start-up done: the scheduler runs submitted work
        self._reload_asked = False           # a SIGHUP came during start-up: reload once serving

    # -- life cycle -----------------------------------------------------------------------

    def run(self) -> int:
        # First: a SIGTERM from here on stops cleanly. The control socket answers (and systemd
        # may stop us) while interrupted rotations are still being finished below.
        self._install_signals()
        sd_notify("STATUS=starting: finishing interrupted rotations")
        self.control.start()
        try:
            for j in self.manager.recover_all(workers=self.config.daemon.workers, stop=self._stop):
                event(log, "rotation_recovered", name=j.name, step=j.step.value)
            if self._stop.is_set():  # asked to stop meanwhile: start nothing new
                return self._shutdown()
            spread = _Spread(self.clock, ARI_START_RATE)
            for cert in self.config.certificates:
                self._reschedule(cert.name, spread)
            self.scheduler.start()
            self.scheduler.every(self.config.daemon.ca_probe_interval, self._probe_ca, job_id="ca-probe")
            self._watch_config()
            if self.sinks.metrics is not None:
                self.sinks.metrics.start()
            self.monitor.start()
            self._start_watchdog()
            self._serving = True
            if self._reload_asked:
                self._sighup()
            sd_notify("READY=1")
            self._housekeep()
            self._update_status()
            event(log, "daemon_ready", certificates=len(self.config.certificates), pid=os.getpid())
            while not self._stop.wait(1.0):
                pass
            return self._shutdown()
        finally:
            self.control.stop()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> int:
        sd_notify("STOPPING=1")
        with self._status_lock:
            if self._status_timer is not None:
                self._status_timer.cancel()
        event(log, "daemon_stopping", in_flight=len(self.flights.in_progress()))
        self.flights.accepting = False
        if not self._serving:  # stopped while starting: what was asked meanwhile waits for a scheduler that never ran
            for flight in self.flights.in_progress():
                self.flights.end(flight, Outcome(flight.name, "failed", "not run: certd was stopped while it "
                                                 "was starting; ask again once it is back"))
        self.scheduler.shutdown()
        if self._observer is not None:
            self._observer.stop()
        self.monitor.stop()
        idle = self.flights.wait_idle(SHUTDOWN_GRACE)
        self.sinks.close()
        event(log, "daemon_stopped", clean=idle)
        self.manager.close()
        if not idle:  # the journal resumes the rotation at the next start
            logging.shutdown()
            os._exit(0)
        return 0

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self._sighup())

    def _sighup(self) -> None:
        """Reload the config off the main thread; during start-up (recovery still writing
        state), once start-up is done. Signal handlers and run() share the main thread."""
        if not self._serving:
            self._reload_asked = True
            return
        threading.Thread(target=self.reload_config, args=("SIGHUP",), daemon=True).start()

    def _start_watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        interval = usec / 1e6 / 2

        def ping() -> None:
            while not self._stop.wait(interval):
                if self.scheduler.running:  # a wedged scheduler stops the pings: systemd restarts us
                    sd_notify("WATCHDOG=1")
        threading.Thread(target=ping, name="watchdog", daemon=True).start()

    def _update_status(self) -> None:
        """Send systemd a STATUS= summary soon, at most one every STATUS_INTERVAL seconds: with
        thousands of certificates, a summary after every finished job cost more than the jobs."""
        with self._status_lock:
            if self._status_timer is not None:
                return  # one is due already and will see this change too
            delay = max(0.0, self._status_sent + STATUS_INTERVAL - self.clock.monotonic())
            self._status_timer = threading.Timer(delay, self._send_status)
            self._status_timer.daemon = True
            self._status_timer.start()

    def _send_status(self) -> None:
        with self._status_lock:
            self._status_timer = None
            first, self._status_sent = self._status_sent == float("-inf"), self.clock.monotonic()
        if first:
            self._scan_states()
        names = set(self.config.names)
        with self._status_lock:
            failing = len(self._failing & names)
        upcoming = self.scheduler.next_scheduled()
        line = f"{len(names)} certificates"
        if upcoming:
            line += f"; next: {upcoming[1]} at {isoformat(upcoming[0])}"
        if failing:
            line += f"; {failing} failing"
        sd_notify(f"STATUS={line}")

    def _scan_states(self) -> None:
        """Read every certificate's state once; afterwards each finished job updates its own
        entry (_note_failures), so neither STATUS= nor the CA probe reads thousands of files."""
        for cert in self.config.certificates:
            self._note_failures(cert.name)
        with self._status_lock:
            self._states_scanned = True

    def _note_failures(self, name: str) -> None:
        """Keep the failing and waiting-for-the-CA sets current after a job on ``name``."""
        try:
            state = self.manager.load_state(name)
        except CertdError:
            return
        with self._status_lock:
            for bucket, member in ((self._failing, state.failures > 0), (self._ca_waiting, state.ca_unreachable)):
                if member:
                    bucket.add(name)
                else:
                    bucket.discard(name)

    def _housekeep(self, names: list[str] | None = None) -> None:
        """Remove what killed processes left (certd/store/housekeeping.py): all at start, then per rotation."""
        try:
            housekeeping.sweep(self.config, names)
        except Exception:  # tidying up must never stop the daemon
            log.exception("housekeeping failed")

    # -- scheduling -----------------------------------------------------------------------

    def _reschedule(self, name: str, spread: _Spread | None = None) -> None:
        try:
            cert = self.config.certificate(name)
        except KeyError:
            return
        when, reason = self.manager.plan(cert)
        if spread is not None and reason == ARI_POLL:
            when = spread.slot(when)
        self.scheduler.schedule(name, when, reason)

    def _scheduled_job(self, name: str) -> None:
        try:
            flight, started = self.flights.begin(name, "scheduled")
        except ShuttingDown:
            return
        if not started:
            return  # a forced renewal or rollback is running; it reschedules when done
        self._run_flight(flight, "renew", force=False, reason="", initiator="scheduler")

    def _run_flight(self, flight: Flight, kind: str, **kw: Any) -> None:
        outcome: Outcome | None = None
        ended = False
        try:
            while not ended:
                outcome = self._fly(flight, kind, kw)
                forced = self.flights.end(flight, outcome, renewed=outcome.result != "not_due", not_run=_not_run)
                ended = forced is None
                if forced is not None:  # a forced renewal joined this unforced one, which renewed nothing
                    flight.say(f"{outcome.message}; now the forced renewal asked for meanwhile")
                    kind, kw = "renew", forced
        finally:
            if not ended:  # interrupted by what _fly does not catch (KeyboardInterrupt)
                self.flights.end(flight, outcome)
            if not self._stop.is_set():
                self._housekeep([flight.name])
                self._reschedule(flight.name)
                self._note_failures(flight.name)
                self._update_status()
        final = flight.result if flight.done else outcome  # what its followers were told
        if final is not None and not final.ok:
            event(log, "rotation_outcome", logging.WARNING, name=flight.name, result=final.result,
                  message=final.message)

    def _fly(self, flight: Flight, kind: str, kw: dict[str, Any]) -> Outcome:
        """Run one ``kind`` operation of ``flight``; every failure becomes its outcome."""
        try:
            cert = self.config.certificate(flight.name)
            progress = lambda _n, m: flight.say(m)  # noqa: E731
            if kind == "renew":
                return self.manager.renew_one(cert, progress=progress, **kw)
            if kind == "revoke":
                return self.manager.revoke(cert, progress=progress, **kw)
            return self.manager.rollback(cert, progress=progress, **kw)
        except UsageError as e:
            return Outcome(flight.name, "refused", str(e))
        except KeyError:
            return Outcome(flight.name, "failed", f"{flight.name} is no longer configured")
        except Exception as e:  # never let a bug kill the worker silently
            log.exception("rotation of %s crashed", flight.name)
            return Outcome(flight.name, "failed", f"internal error: {type(e).__name__}: {e}")

    def _probe_ca(self) -> None:
        """While certificates wait out a backoff because the CA was unreachable, ask the CA's
        directory (one cheap GET) every ``ca_probe_interval``; once it answers, retry them now
        instead of at the end of their backoff (no day-long stuck backoff after an outage)."""
        if not self._states_scanned:
            self._scan_states()
        with self._status_lock:
            names = set(self._ca_waiting)
        waiting = [c for c in self.config.certificates if c.name in names]
        if not waiting or not self.manager.issuer.reachable():
            return
        event(log, "ca_reachable_again", names=",".join(c.name for c in waiting))
        for cert in waiting:
            try:
                flight, started = self.flights.begin(cert.name, "scheduled")
            except ShuttingDown:
                return
            if started:
                self.scheduler.submit(self._run_flight, flight, "renew", job_id=f"run:{cert.name}", force=False,
                                      reason="", initiator="scheduler", skip_backoff=True)

    # -- config reload --------------------------------------------------------------------

    def _watch_config(self) -> None:
        target = str(self.config_path.resolve())
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, ev: FileSystemEvent) -> None:
                paths = {str(getattr(ev, "src_path", "")), str(getattr(ev, "dest_path", "") or "")}
                if target in paths and ev.event_type in ("modified", "created", "moved", "closed"):
                    daemon._debounced_reload()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.config_path.resolve().parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _debounced_reload(self) -> None:
        # Editors write a file in several events; act once when they are done.
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        self._reload_timer = threading.Timer(CONFIG_DEBOUNCE, self.reload_config, args=("file changed",))
        self._reload_timer.daemon = True
        self._reload_timer.start()

    def reload_config(self, source: str) -> tuple[bool, list[str]]:
        """Apply a valid config live; keep the running one on any problem."""
        with self._reload_lock:
            try:
                new = config_mod.load(self.config_path, check_runtime=True)
            except ConfigError as e:
                for problem in e.problems:
                    event(log, "config_rejected", logging.ERROR, source=source, problem=problem)
                self.manager.emit("config_rejected", "", initiator=source, outcome="rejected",
                                  reason="; ".join(e.problems))
                event(log, "config_kept", logging.ERROR,
                      reason="the new configuration is invalid; the running one stays")
                return False, e.problems
            old = self.config
            if new == old:
                return True, []
            if new.daemon != old.daemon:
                event(log, "config_restart_needed", logging.WARNING,
                      detail="[daemon] changes (state_dir, control_socket, workers, ...) take effect after a restart")
                new = dataclasses.replace(new, daemon=old.daemon)
            old_by_name = {c.name: c for c in old.certificates}
            new_by_name = {c.name: c for c in new.certificates}
            self.config = new
            self.manager.reconfigure(new)
            self.sinks.reconfigure(new)
            self.monitor.reconfigure()
            self._states_scanned = False  # names came or went: the next CA probe looks again
            for name in old_by_name.keys() - new_by_name.keys():
                self.scheduler.unschedule(name)
            changed = [n for n, c in new_by_name.items() if old_by_name.get(n) != c]
            for name in changed:
                self._reschedule(name)
            self.manager.emit("config_changed", "", initiator=source, detail={
                "added": sorted(new_by_name.keys() - old_by_name.keys()),
                "removed": sorted(old_by_name.keys() - new_by_name.keys()),
                "changed": sorted(n for n in changed if n in old_by_name)})
            event(log, "config_reloaded", source=source,
                  added=",".join(sorted(new_by_name.keys() - old_by_name.keys())) or None,
                  removed=",".join(sorted(old_by_name.keys() - new_by_name.keys())) or None,
                  changed=",".join(sorted(n for n in changed if n in old_by_name)) or None)
            self._update_status()
            return True, []

    # -- control API ----------------------------------------------------------------------

    def _select(self, names: Any) -> list[CertificateConfig]:
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise UsageError("names must be a list of strings")
        return self.manager.select(names or [])

    def _api_status(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any] | Preformatted:
        certs, runs = self._select(query.get("name")), self.scheduler.next_runs()
        if query.get("format") == ["lines"]:  # the CLI prints it as it is (status --json)
            return Preformatted(rows_document("certificates", [
                self.manager.status_json(c, next_run=runs.get(c.name)) for c in certs]))
        rows = []
        for cert in certs:
            row = self.manager.status(cert)
            if cert.name in runs:
                row["next_run"] = runs[cert.name]
            rows.append(row)
        return {"certificates": rows}

    def _api_renew(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]] | dict[str, Any]:
        certs = list(self.config.certificates) if body.get("all") else self._select(body.get("names"))
        force = bool(body.get("force"))
        reason = (check_reason(body.get("reason") or "", "reason")
                  or ("forced by operator" if force else "requested by operator"))
        initiator = str(caller)
        flights = []
        for cert in certs:
            args = {"force": force, "reason": reason, "initiator": initiator}
            if force and body.get("ignore_duplicate_limit"):
                args["ignore_duplicate_limit"] = True
            try:
                flight, started = self.flights.begin(cert.name, "forced" if force else "requested",
                                                     forced=args if force else None)
            except ShuttingDown as e:
                raise UsageError(str(e)) from None
            if started:
                event(log, "renewal_requested", name=cert.name, initiator=initiator, force=force, reason=reason)
                self.scheduler.submit(self._run_flight, flight, "renew", job_id=f"run:{cert.name}", **args)
            else:
                event(log, "renewal_joined", name=cert.name, initiator=initiator, running=flight.kind)
                then = " (renewing after it if it finds nothing due)" if force and flight.kind in UNFORCED else ""
                flight.say(f"joined the {flight.kind} rotation already in progress (one order per certificate){then}")
            flights.append(flight)
        if not body.get("wait"):
            return {"accepted": [f.name for f in flights]}
        return _follow(flights)

    def _api_rollback(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        name = self._one_name(body, "rollback")
        to_version = body.get("to_version")
        if to_version is not None and not isinstance(to_version, int):
            raise UsageError("to_version must be an integer")
        return self._start_alone(name, "rollback", caller, to_version=to_version,
                                 reason=check_reason(body.get("reason") or "", "reason") or "rollback by operator")

    def _api_revoke(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        from certd.engine.revocation import parse_reason
        name = self._one_name(body, "revoke")
        return self._start_alone(name, "revoke", caller, reason=parse_reason(str(body.get("reason") or "")))

    def _one_name(self, body: dict[str, Any], what: str) -> str:
        name = body.get("name")
        if not isinstance(name, str):
            raise UsageError(f"{what} needs a certificate name")
        self._select([name])
        return name

    def _start_alone(self, name: str, kind: str, caller: Caller, **kw: Any) -> Iterator[dict[str, Any]]:
        """Run a ``kind`` operation on ``name`` in the pool and stream its progress. Unlike a
        renewal it never joins a rotation in flight (it would change what that one commits):
        refused while one runs."""
        try:
            flight, started = self.flights.begin(name, kind)
        except ShuttingDown as e:
            raise UsageError(str(e)) from None
        if not started:
            raise UsageError(f"a {flight.kind} rotation of {name} is in progress; try again when it finishes")
        initiator = str(caller)
        event(log, _REQUESTED[kind], name=name, initiator=initiator, **kw)
        self.scheduler.submit(self._run_flight, flight, kind, job_id=f"run:{name}", initiator=initiator, **kw)
        return _follow([flight])

    def _api_verify(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        outcomes = [self.manager.verify_now(c) for c in self._select(body.get("names"))]
        return {"outcomes": [_outcome_json(o) for o in outcomes]}

    def _api_drift(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        names = [c.name for c in self._select(query.get("name"))] if query.get("name") else None
        return drift.to_json(self.monitor.check_now(names))

    def _api_history(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        """Read-only, so control_group members (who cannot read the 0700 state dir) see it too."""
        from certd.ops import audit
        names = query.get("name") or [None]
        if len(names) != 1:
            raise UsageError("history takes at most one certificate name")
        return audit.history(self.config.daemon.state_dir, names[0], set(self.config.names),
                             self.config.names_summary())

    def _api_reload(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        ok, problems = self.reload_config(f"control socket ({caller})")
        return {"ok": ok, "problems": problems}


class _Spread:
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
    return Outcome(outcome.name, "failed", f"{outcome.message}; the forced renewal asked for meanwhile did not "
                   "run: certd is shutting down; ask again once it is back")


def _follow(flights: list[Flight]) -> Iterator[dict[str, Any]]:
    for flight in flights:
        for ev in flight.follow():
            yield {"event": "progress", **ev}
    yield {"event": "result", "outcomes": [_outcome_json(f.result) for f in flights if f.result is not None]}


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return {"name": o.name, "result": o.result, "message": o.message, "version": o.version,
            "serial": o.serial, "ok": o.ok}
