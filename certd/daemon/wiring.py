"""Where the manager's event sinks are chosen, for the CLI and the daemon alike.

Every process that changes certificates (``certd run`` and the in-process CLI) builds its
:class:`~certd.engine.manager.Manager` through :func:`build_manager`, so the audit log, metrics and
alerts see the same events whichever process did the work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from certd.ops import audit
from certd.store import housekeeping
from certd.ops.alerts import Alerter
from certd.ops.metrics import Metrics
from certd.core.clock import Clock, SystemClock
from certd.config import Config
from certd.core.errors import ConfigError, StoreError, UsageError
from certd.deploy import strictmodes
from certd.crypto.kekload import load_source
from certd.engine.keycustody import rotate_kek
from certd.core.events import EventBus, LifecycleEvent, Sink
from certd.engine.manager import Manager, whoami
from certd.store.files import FileStore, keyring_of
from certd.store.auditspool import ChainAppender, SpoolingAudit
from certd.store.opening import open_store


@dataclass
class Sinks:
    """The long-lived sinks a process owns besides the audit log: webhook alerts (any process
    when ``[alerts]`` is configured; always in the daemon, so a reload can add it) and the
    metrics (the daemon only). The daemon reconfigures and closes them with itself."""

    alerts: Alerter | None = None
    metrics: Metrics | None = None
    #: [cluster]: the audit records the database did not take (replayed when the probe sees it again)
    audit_spool: SpoolingAudit | None = None

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


def owns_state_dir(store: FileStore) -> bool:
    """Whether this process runs as the state directory's owner: only then may it write key
    files there (as root it would leave root-owned files the daemon's user cannot read)."""
    try:
        return os.stat(store.root).st_uid == os.geteuid()
    except FileNotFoundError:
        return True  # created by this process, as its own


def seal_existing_keys(manager: Manager, store: FileStore, *, full_scan: bool = False) -> None:
    """``[keys]`` added to a state directory holding plain keys: seal them now (resumable), and
    say so in the audit log. Only by the state directory's owner (the daemon, or the CLI run as
    certd's user); ``full_scan`` (the daemon's start) looks again even where the directory is
    marked all sealed, for keys a process without ``[keys]`` wrote since."""
    if not owns_state_dir(store) or not os.access(store.root, os.W_OK):
        return
    sealed = store.keys.seal_existing(full_scan=full_scan)  # without [keys]: drops the "all sealed" mark
    if sealed:
        ring = store.keys.ring
        manager.emit("keys_sealed", "", initiator=whoami(), reason="[keys] configured: plain keys sealed",
                     detail={"count": len(sealed), "kek": ring.current.kek_id if ring else "",
                             "slots": ",".join(sealed[:50])})


def reconfigure_keys(manager: Manager, config: Config) -> None:
    """``[keys]`` changed in a reload: seal with the new ring from now on (and seal what is still
    plain). :class:`~certd.crypto.custody.CustodyError` leaves the running ring as it was."""
    store = manager.store
    unsafe = strictmodes.keys_problems(config)
    if unsafe:
        raise ConfigError(f"{config.path}: [keys]: {unsafe[0]}")
    if isinstance(store, FileStore):
        ring, loader = keyring_of(config)
        store.keys.reconfigure(ring, loader)
        try:
            seal_existing_keys(manager, store, full_scan=True)
        except StoreError as e:  # resumable: the next start (or reload) seals the rest
            manager.emit("keys_seal_failed", "", initiator=whoami(), outcome="failed", reason=str(e))


def node_stamped(sink: Sink, node: str) -> Sink:
    """``sink`` with every record naming the fleet node it happened on (``detail.node``):
    a fleet's audit log is one chain written by every node."""
    def stamped(ev: LifecycleEvent) -> None:
        sink(ev if "node" in ev.detail else dataclasses.replace(ev, detail={**ev.detail, "node": node}))
    return stamped


def build_manager(config: Config, *, clock: Clock | None = None, daemon: bool = False,
                  lock_timeout: float = 0.0, sinks: Sinks | None = None, maintenance: bool = True) -> Manager:
    clock = clock or SystemClock()
    loose_mode = housekeeping.secure_state_dir(config.daemon.state_dir)  # before anything is read or written
    # The store's own clock stays the system's: lease expiry must not follow a test's fake clock.
    unsafe = strictmodes.keys_problems(config)
    if unsafe:
        raise ConfigError(f"{config.path}: [keys]: {unsafe[0]}")
    store = open_store(config, audit_group=config.daemon.control_group)
    audit_sink: Sink = store.audit
    if config.cluster is not None:  # nothing lost while the database is down (certd.store.auditspool)
        spool = SpoolingAudit(cast(ChainAppender, store.audit), config.daemon.state_dir, config.cluster.node,
                              SystemClock())
        audit_sink = node_stamped(spool, config.cluster.node)
        if sinks is not None:
            sinks.audit_spool = spool
    manager = Manager(config, store=store, clock=clock, lock_timeout=lock_timeout,
                      events=build_events(config, clock, daemon=daemon, sinks=sinks, audit_sink=audit_sink))
    if maintenance and isinstance(store, FileStore):  # not for commands that promise to change nothing
        seal_existing_keys(manager, store, full_scan=daemon)
    if loose_mode is not None:
        manager.emit("state_dir_tightened", "", initiator=whoami(), reason=f"state_dir had mode {loose_mode:04o}",
                     detail={"path": str(config.daemon.state_dir), "old_mode": f"{loose_mode:04o}", "mode": "0700"})
    manager.retries = daemon  # only the daemon retries by itself (and may say so)
    if sinks is not None and sinks.metrics is not None:
        sinks.metrics.bind(manager)  # the store-backed gauges read the manager's status
    return manager


def rotate_kek_with(manager: Manager, source: str, initiator: str) -> dict[str, Any]:
    """``certd kek rotate --new SOURCE`` in this process (the CLI's, or the daemon's for
    ``/v1/kek/rotate``, so the files stay its user's and its ring learns the new KEK at once)."""
    keys = manager.config.keys
    store = manager.store
    if keys is None or not isinstance(store, FileStore):
        raise UsageError("kek rotate: no [keys] section in the running configuration: keys are stored unencrypted; "
                         "add [keys] with kek_file (see `certd kek init`) first")
    if not owns_state_dir(store):
        raise UsageError(f"kek rotate: run it as the owner of {store.root} (e.g. `runuser -u certd -- certd kek rotate "
                         f"...`), or with the daemon running: files written as another user would be unreadable to it")
    if not source.startswith("pkcs11:"):
        unsafe = strictmodes.unsafe_path(Path(source), what="new KEK file")
        if unsafe is not None:
            raise UsageError(f"kek rotate: {unsafe}")
    return rotate_kek(store.keys, load_source(keys, source), source, manager.ports.clock, manager.emit, initiator)
