"""Where the manager's event sinks are chosen, for the CLI and the daemon alike.

Every process that changes certificates (``certd run`` and the in-process CLI) builds its
:class:`~certd.engine.manager.Manager` through :func:`build_manager`, so the audit log, metrics and
alerts see the same events whichever process did the work.
"""

from __future__ import annotations

from dataclasses import dataclass

from certd.ops import audit
from certd.store import housekeeping
from certd.ops.alerts import Alerter
from certd.ops.metrics import Metrics
from certd.core.clock import Clock, SystemClock
from certd.config import Config
from certd.core.events import EventBus, Sink
from certd.engine.manager import Manager, whoami
from certd.store.files import FileStore


@dataclass
class Sinks:
    """The long-lived sinks a process owns besides the audit log: webhook alerts (any process
    when ``[alerts]`` is configured; always in the daemon, so a reload can add it) and the
    metrics (the daemon only). The daemon reconfigures and closes them with itself."""

    alerts: Alerter | None = None
    metrics: Metrics | None = None

    def reconfigure(self, config: Config) -> None:
        if self.alerts is not None:
            self.alerts.reconfigure(config.alerts)
        if self.metrics is not None:
            self.metrics.reconfigure(config)

    def close(self, timeout: float = 5.0) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        if self.alerts is not None:
            self.alerts.close(timeout)


def build_sinks(config: Config, clock: Clock, *, daemon: bool) -> Sinks:
    alerts = Alerter(config.alerts, clock) if daemon or config.alerts is not None else None
    return Sinks(alerts, Metrics(config, clock) if daemon else None)


def build_events(config: Config, clock: Clock, *, daemon: bool, sinks: Sinks | None = None,
                 audit_sink: Sink | None = None) -> EventBus:
    """The event bus with every configured sink subscribed. ``daemon`` is True for ``certd run``
    (long-lived sinks such as the metrics endpoint belong there only); ``audit_sink``: the
    store's (the state directory's audit log when not given)."""
    bus = EventBus()
    sinks = sinks or build_sinks(config, clock, daemon=daemon)
    if sinks.alerts is not None:
        bus.subscribe(sinks.alerts.on_event)
    if sinks.metrics is not None:
        bus.subscribe(sinks.metrics.on_event)
        bus.subscribe_measurements(sinks.metrics.on_measure)
    bus.subscribe(audit_sink or audit.open_for(config.daemon.state_dir, config.daemon.control_group))
    return bus


def build_manager(config: Config, *, clock: Clock | None = None, daemon: bool = False,
                  lock_timeout: float = 0.0, sinks: Sinks | None = None) -> Manager:
    clock = clock or SystemClock()
    loose_mode = housekeeping.secure_state_dir(config.daemon.state_dir)  # before anything is read or written
    # The store's own clock stays the system's: lease expiry must not follow a test's fake clock.
    store = FileStore(config.daemon.state_dir, audit_group=config.daemon.control_group)
    manager = Manager(config, store=store, clock=clock, lock_timeout=lock_timeout,
                      events=build_events(config, clock, daemon=daemon, sinks=sinks, audit_sink=store.audit))
    if loose_mode is not None:
        manager.emit("state_dir_tightened", "", initiator=whoami(), reason=f"state_dir had mode {loose_mode:04o}",
                     detail={"path": str(config.daemon.state_dir), "old_mode": f"{loose_mode:04o}", "mode": "0700"})
    manager.retries = daemon  # only the daemon retries by itself (and may say so)
    if sinks is not None and sinks.metrics is not None:
        sinks.metrics.bind(manager)  # the store-backed gauges read the manager's status
    return manager
