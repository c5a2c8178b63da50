"""``certd run``: the composition root of the long-running service.

Start-up: load and check the config, finish rotations a crash left unfinished, schedule every
certificate, open the control socket, watch the config file, tell systemd READY=1. Then the
main thread only waits for signals: SIGHUP reloads the config (as does an edit of the file),
SIGTERM/SIGINT stop taking work, let in-flight rotations reach a safe point (committed or rolled
back) within ``SHUTDOWN_GRACE`` seconds, and exit 0. A rotation still running past that bound
is left to its journal: the next start resumes it.

The parts: :mod:`~certd.daemon.jobs` (what the worker pool runs), :mod:`~certd.daemon.api`
(the control socket's handlers), :mod:`~certd.daemon.systemd` (notify, STATUS=, watchdog),
:mod:`~certd.daemon.config_watch` (the config file), over the engine's
:class:`~certd.engine.manager.Manager`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path

from certd import config as config_mod
from certd.config import Config
from certd.core.clock import Clock, SystemClock
from certd.core.errors import CertdError, ConfigError
from certd.daemon import storehealth
from certd.daemon.api import MUTATING, ControlAPI
from certd.daemon.config_watch import CONFIG_DEBOUNCE, ConfigWatcher
from certd.daemon.control import ControlServer
from certd.daemon.fleet import start_fleet
from certd.daemon.jobs import ARI_START_RATE, Jobs, Spread
from certd.daemon.monitor import Monitor
from certd.daemon.scheduler import Flights, Scheduler
from certd.daemon.systemd import STATUS_INTERVAL, StateTracker, sd_notify, start_watchdog
from certd.daemon.wiring import build_manager, build_sinks, reconfigure_keys
from certd.engine.destruction import pass_interval
from certd.engine.outcome import Outcome, Result
from certd.ops.log import event

__all__ = ["ARI_START_RATE", "CONFIG_DEBOUNCE", "SHUTDOWN_GRACE", "STATUS_INTERVAL", "Daemon", "sd_notify"]

log = logging.getLogger("certd.daemon")

SHUTDOWN_GRACE = 60.0
#: seconds between looks at every certificate's store files for changes the daemon did not make
#: (a hand edit): status listings trust the daemon's own writes (Planner.listing_json). At
#: 100,000 certificates a look costs ~2 s of CPU: under 1 % of a core at this pace.
RECHECK_INTERVAL = 300.0


class Daemon:
    def __init__(self, config_path: Path, *, clock: Clock | None = None) -> None:
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.config: Config = config_mod.load(config_path, check_runtime=True)
        self.sinks = build_sinks(self.config, self.clock, daemon=True)
        self.manager = build_manager(self.config, clock=self.clock, daemon=True, lock_timeout=SHUTDOWN_GRACE,
                                     sinks=self.sinks)
        self._stop = threading.Event()
        self.flights = Flights(self.clock)
        self.jobs: Jobs  # the scheduler calls it, and it needs the scheduler
        self.scheduler = Scheduler(self.config.daemon.workers, lambda name: self.jobs.scheduled(name), self.clock)
        self.tracker = StateTracker(lambda: self.config, self.manager.load_state, self.scheduler, self.clock)
        self.jobs = Jobs(lambda: self.config, self.manager, self.flights, self.scheduler, self.tracker, self._stop)
        self.monitor = Monitor(self.manager, lambda: self.config, clock=self.clock, metrics=self.sinks.metrics,
                               busy=lambda name: any(f.name == name for f in self.flights.in_progress()),
                               submit=self.scheduler.submit)
        self.store_health = storehealth.for_daemon(self.config, self.manager.store, self.clock, self.sinks.metrics,
                                                   lambda: self.config)  # [cluster] only
        if self.store_health is not None:  # [cluster]: what waits for the database while it is down
            self.jobs.store_up = self.monitor.store_up = self.store_health.is_up
            self.store_health.on_up += [self._replay_audit, self.monitor.reconfigure]
            if self.sinks.audit_spool is not None:
                self.sinks.audit_spool.store_up = self.store_health.is_up
        api = ControlAPI(lambda: self.config, self.jobs, self.monitor, self.reload_config,
                         store_health=self.store_health)
        self.control = ControlServer(self.config.daemon.control_socket, api.routes(),
                                     group=self.config.daemon.control_group, mutating=set(MUTATING))
        self.watcher = ConfigWatcher(config_path, self.reload_config)
        self.fleet = start_fleet(self.manager, lambda: self.config, self._stop)
        self._reload_lock = threading.Lock()
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
            if self.fleet is not None:
                self.fleet.reclaim()
            for j in self.manager.recover_all(workers=self.config.daemon.workers, stop=self._stop):
                event(log, "rotation_recovered", name=j.name, step=j.step.value)
            if self._stop.is_set():  # asked to stop meanwhile: start nothing new
                return self._shutdown()
            self._start_serving()
            while not self._stop.wait(1.0):
                pass
            return self._shutdown()
        finally:
            self.control.stop()

    def _start_serving(self) -> None:
        spread = Spread(self.clock, ARI_START_RATE)
        for cert in self.config.certificates:
            self.jobs.reschedule(cert.name, spread)
        self.scheduler.start()
        self.scheduler.every(self.config.daemon.ca_probe_interval, self.jobs.probe_ca, job_id="ca-probe")
        self.scheduler.every(pass_interval(self.config), self.jobs.destroy_retired, job_id="key-destruction")
        self.scheduler.every(RECHECK_INTERVAL, self.jobs.recheck_facts, job_id="status-recheck")
        self.watcher.start()
        if self.sinks.metrics is not None:
            self.sinks.metrics.start()
        self.monitor.start()
        if self.store_health is not None:
            self.store_health.start()
            try:
                if self.sinks.audit_spool is not None:
                    self.sinks.audit_spool.pending()  # the spool exists as the daemon's user, 0600: a CLI run
                    # as root appends to it (and leaves it readable to the daemon) instead of creating it
                self._replay_audit()  # records a process of this node spooled while no daemon ran
            except (CertdError, OSError) as e:  # never fatal: the next record or the probe's "up" retries
                event(log, "audit_spool_replay_failed", logging.WARNING, error=str(e))
        if self.fleet is not None:
            self.fleet.start()
        start_watchdog(self.scheduler, self._stop)
        self._serving = True
        if self._reload_asked:
            self._sighup()
        sd_notify("READY=1")
        self.jobs.housekeep()
        self.tracker.update()
        event(log, "daemon_ready", certificates=len(self.config.certificates), pid=os.getpid())

    def _replay_audit(self) -> None:
        """Append the audit records spooled while the database was down (certd.store.auditspool)."""
        if self.sinks.audit_spool is not None:
            self.sinks.audit_spool.replay()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self.tracker.cancel()
        event(log, "daemon_stopping", in_flight=len(self.flights.in_progress()))
        self.flights.accepting = False
        if not self._serving:  # stopped while starting: what was asked meanwhile waits for a scheduler that never ran
            for flight in self.flights.in_progress():
                self.flights.end(flight, Outcome(flight.name, Result.FAILED, "not run: certd was stopped while it "
                                                 "was starting; ask again once it is back"))
        self.scheduler.shutdown()
        self.watcher.stop()
        self.monitor.stop()
        if self.store_health is not None:
            self.store_health.stop()
        if self.fleet is not None:
            self.fleet.stop()
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

    # -- config reload --------------------------------------------------------------------

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
            refused = self._apply_valid(old, new, source) if new != old else None
            if refused is not None:
                return False, [refused]
            # The state directory afresh too: a hand edit shows in the status listing now, not at the
            # next recheck (RECHECK_INTERVAL); ~2 s at 100,000 certificates, less than the file's load.
            self.manager.recheck(list(self.config.certificates))
            return True, []

    def _apply_valid(self, old: Config, new: Config, source: str) -> str | None:
        """Apply ``new`` (its [daemon] changes wait for a restart); the problem if [keys] cannot be."""
        if new.daemon != old.daemon:
            event(log, "config_restart_needed", logging.WARNING,
                  detail="[daemon] changes (state_dir, control_socket, workers, ...) take effect after a restart")
            new = dataclasses.replace(new, daemon=old.daemon)
        if new.keys != old.keys:
            try:
                reconfigure_keys(self.manager, new)
            except CertdError as e:
                problem = f"{self.config_path}: [keys]: {e}"
                event(log, "config_rejected", logging.ERROR, source=source, problem=problem)
                self.manager.emit("config_rejected", "", initiator=source, outcome="rejected", reason=problem)
                return problem
        self._apply(old, new, source)
        return None

    def _apply(self, old: Config, new: Config, source: str) -> None:
        """Switch every part to ``new``; reschedule what changed; audit and log the difference."""
        old_by_name = {c.name: c for c in old.certificates}
        new_by_name = {c.name: c for c in new.certificates}
        self.config = new
        self.manager.reconfigure(new)
        self.sinks.reconfigure(new)
        self.monitor.reconfigure()
        self.tracker.forget_scan()  # names came or went: the next CA probe looks again
        if pass_interval(new) != pass_interval(old):
            self.scheduler.every(pass_interval(new), self.jobs.destroy_retired, job_id="key-destruction")
        for name in old_by_name.keys() - new_by_name.keys():
            self.scheduler.unschedule(name)
        changed = [n for n, c in new_by_name.items() if old_by_name.get(n) != c]
        for name in changed:
            self.jobs.reschedule(name)
        added = sorted(new_by_name.keys() - old_by_name.keys())
        removed = sorted(old_by_name.keys() - new_by_name.keys())
        modified = sorted(n for n in changed if n in old_by_name)
        self.manager.emit("config_changed", "", initiator=source,
                          detail={"added": added, "removed": removed, "changed": modified})
        if self.fleet is not None:
            self.fleet.reconfigure()
        event(log, "config_reloaded", source=source, added=",".join(added) or None,
              removed=",".join(removed) or None, changed=",".join(modified) or None)
        self.tracker.update()
