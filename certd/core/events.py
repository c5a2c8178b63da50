"""Lifecycle events: one record per thing that happened to a certificate, fanned out to sinks.

The manager and daemon ``emit`` events; the audit log, metrics and alert webhooks subscribe.
A sink that fails is logged and skipped: a full disk under the audit log or a webhook that is
down must never fail a rotation that is protecting a served certificate.

Events never carry key material: only serials, fingerprints, SPKI hashes and dates.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from certd.core.errors import CertdError

log = logging.getLogger("certd.events")

# Stable event kinds (snake_case; audit records and metrics use them as they are).
KINDS = frozenset({
    "issued",            # a new version was issued, checked and stored
    "forced",            # an operator forced a renewal (initiator + reason)
    "deployed",          # the switch made a version live on the deploy targets
    "verified",          # every endpoint served the version
    "renewed",           # a renewal committed
    "renewal_failed",    # a renewal failed before or after the switch
    "rolled_back",       # a failed rotation was rolled back and the old version proven served
    "rollback_failed",   # even the rollback could not be proven: page someone
    "operator_rollback", # an operator switched to an earlier version
    "revoked",           # revoked at the CA
    "key_destroyed",     # a key was destroyed: compromised, or retired past destroy_after
    "version_pruned",    # an old version was removed (its key overwritten)
    "config_changed",    # the daemon applied a new configuration
    "config_rejected",   # the daemon refused an invalid configuration
    "drift_found",       # configured / stored / deployed / served disagree
    "drift_repaired",
    "expiring_soon",     # past the emergency point without a successful renewal
    "state_dir_tightened",  # the state dir was group/world accessible and certd made it 0700
    "cert_broken",       # certd cannot plan or deploy this certificate (state "broken"); the rest go on
    "keys_sealed",       # [keys] added: the plain keys in the state dir were sealed under the KEK
    "keys_seal_failed",  # ... and that failed part way (resumed at the next start or reload)
    "kek_rotation_started",  # certd kek rotate: every key's data key is being re-wrapped under a new KEK
    "kek_rotated",       # ... and all were
    "backup_exported",   # certd backup export: every version sealed to the age backup_recipient (no key material here)
    "backup_restored",   # certd backup restore: a sealed backup written into an empty state dir
    "imported",          # certd import certbot: a lineage's current certificate stored as this version
    "dry_run",           # certd renew --dry-run: an order against the staging directory, nothing stored
    "node_applied",      # a fleet node deployed the desired version (outcome "failed": it could not; desired stays)
    "node_switch_back_refused",  # a node's apply failed and what it served before may not be deployed: it stays
    "order_intent",      # an order intent (journaled before newOrder, no URL) was looked up at the CA: outcome
                         # "found" (its order is resumed) or "not_found" (ordered afresh)
    "version_adopted",   # a fleet node rolls out the version another node stored and left (no second order)
    "node_removed",      # certd nodes remove: the node no longer counts in the fleet's status
    "renew_refused",     # an operator's renewal refused: the fleet's database is unreachable from the node
    "release_opened",    # [certificate.rollout]: a stored version waits for its canaries (desired not moved)
    "release_step",      # a release moved on: canary, promoted, fleet, done (or a canary was replaced)
    "release_aborted",   # a canary failed: no other node changed; the version is marked bad
    "release_rolled_back",  # failures after promotion beyond max_failed_nodes: the fleet went back
    "release_held",      # certd release hold: the release stops before widening (audited, operator)
    "release_resumed",   # certd release resume
    "fleet_rollback",    # certd rollback in a fleet: desired moved back; the version left is marked bad
    "key_compromise_complete",  # keyCompromise in a fleet: every node moved off the key and destroyed it
})


@dataclass(frozen=True)
class LifecycleEvent:
    kind: str
    name: str                               # certificate name ("" for daemon-wide events)
    time: datetime
    initiator: str = "scheduler"            # scheduler | ari | uid=N(user) | ...
    reason: str = ""
    outcome: str = "success"
    old_serial: str | None = None
    new_serial: str | None = None
    spki_sha256: str | None = None
    not_after: datetime | None = None
    version: int | None = None
    duration: float | None = None           # seconds
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown lifecycle event kind {self.kind!r}")


Sink = Callable[[LifecycleEvent], None]
#: (what was timed, seconds, labels): ``acme_request`` (one HTTP request to the CA) and
#: ``hook`` (one reload hook, label ``hook``). Metrics subscribe; nothing is recorded otherwise.
MeasureSink = Callable[[str, float, dict[str, str]], None]


class EventBus:
    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self._measure_sinks: list[MeasureSink] = []
        self._lock = threading.Lock()

    def subscribe_measurements(self, sink: MeasureSink) -> None:
        with self._lock:
            self._measure_sinks.append(sink)

    def measure(self, what: str, seconds: float, **labels: str) -> None:
        """Report a duration to the measurement sinks; like :meth:`emit`, never raises."""
        for sink in list(self._measure_sinks):
            try:
                sink(what, seconds, labels)
            except Exception:  # a sink must never break the caller
                log.exception("measurement sink %r failed for %s", sink, what)

    def subscribe(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def emit(self, event: LifecycleEvent) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink(event)
            except CertdError as e:  # a full disk, a webhook down: one line, no traceback
                log.error("event_sink_failed sink=%s event=%s name=%s error=%s",
                          _sink_name(sink), event.kind, event.name or "-", e)
            except Exception:  # a sink must never break the caller; a bug gets its traceback
                log.exception("event sink %r failed for %s %s", sink, event.kind, event.name)


def _sink_name(sink: Callable[..., Any]) -> str:
    owner = getattr(sink, "__self__", sink)
    return type(owner).__name__ if not hasattr(owner, "__qualname__") else str(owner.__qualname__)
