"""Where a renewal and an operator's rollback meet a fleet release (certd/core/release.py).

With ``[certificate.rollout]`` on a fleet's store, the node whose renewal stored a new version
opens a release instead of rolling it out itself (:func:`open_release`): it deploys nothing and
the desired version stays; the canaries deploy it first (certd/daemon/releasing.py drives the
steps). While a release is unfinished no renewal of that certificate orders again
(:func:`blocking_release`): one release at a time, one order per renewal.

A single host, a first issuance (nothing to fall back to) and a certificate without a rollout
table go on exactly as before: these functions return None.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from certd.config import CertificateConfig
from certd.core import release as core
from certd.core.release import Release
from certd.core.clock import Clock, isoformat
from certd.core.rotation import Effects, Journal
from certd.engine import attempts
from certd.engine.attempts import CertState
from certd.engine.lifecycle import VersionStatus
from certd.engine.outcome import Outcome, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.statebook import adopt, carry_notes
from certd.ops.log import event
from certd.store.port import VersionInfo

log = logging.getLogger("certd.release")


class ReleaseStore(Protocol):
    """What a store with releases offers (:class:`certd.store.pgrelease.ReleaseBook`)."""

    def get(self, name: str) -> Release | None: ...
    def open(self, release: Release) -> None: ...
    def record(self, release: Release, effect: core.Effect) -> None: ...
    def bad(self, name: str, version: int) -> str | None: ...
    def roll_back(self, name: str, left: int, to: int, reason: str, now: datetime) -> None: ...


def book(ports: Ports) -> ReleaseStore | None:
    """The store's releases, or None on a single host."""
    found: ReleaseStore | None = getattr(ports.store, "releases", None)
    return found


def blocking_release(ports: Ports, cert: CertificateConfig) -> Outcome | None:
    """NOT_DUE while a release of ``cert`` is unfinished (it is that renewal still going on)."""
    releases = book(ports) if cert.rollout is not None else None
    r = releases.get(cert.name) if releases is not None else None
    if r is None or r.finished:
        return None
    return Outcome(cert.name, Result.NOT_DUE, f"version {r.version} is being released ({r.state.value}); "
                                              f"no new order until the release ends", ports.store.current(cert.name))


def open_release(ports: Ports, planner: Planner, cert: CertificateConfig, state: CertState, current: int | None,
                 version: int, serial: str, initiator: str, reason: str) -> Outcome | None:
    """Open a release of the just-stored ``version`` (under the certificate's lease), or None
    when this certificate is not released in steps here. The renewal itself succeeded (one
    certificate issued and stored): ``state`` says so, as a committed renewal's does."""
    releases = book(ports) if cert.rollout is not None and current is not None else None
    if releases is None:
        return None
    now = ports.clock.now()
    r = core.open_release(cert.name, version, current, now)
    releases.open(r)
    notes = carry_notes(state)

    def change(s: CertState) -> None:
        notes(s)
        s.failures, s.last_error, s.ari, s.ca_unreachable = 0, None, None, False
        attempts.clear(s)
        s.last_success, s.last_result = isoformat(now), "renewed"
    adopt(state, planner.update_state(cert.name, change))
    event(log, "release_opened", name=cert.name, version=version, previous=current)
    ports.emit("release_opened", cert.name, initiator=initiator, reason=reason, version=version, new_serial=serial,
               detail={"previous": current, "canaries": _canaries(cert)})
    return Outcome(cert.name, Result.RENEWED, f"version {version} (serial {serial}) stored; released to the canaries "
                                              f"first ({_canaries(cert)}); `certd status --fleet` shows the release",
                   version, serial)


def _canaries(cert: CertificateConfig) -> str:
    want = cert.rollout.canaries if cert.rollout is not None else 0
    return ", ".join(want) if isinstance(want, tuple) else f"{want} node(s)"


class _Versions(Protocol):
    def versions(self, name: str) -> list[int]: ...
    def load_info(self, name: str, version: int) -> VersionInfo: ...


def deploy_refusal(store: _Versions, name: str, version: int) -> str | None:
    """Why ``version`` of ``name`` may not be deployed (the predicate "deployable", S3): not
    stored, revoked, its key compromised or destroyed, or marked bad by a release; None if it
    may. Read afresh each time: a version turns bad while a node works."""
    if version not in store.versions(name):
        return f"{name} has no version {version} (stored: {', '.join(map(str, store.versions(name))) or 'none'})"
    return VersionStatus.from_meta(store.load_info(name, version).meta).deploy_refusal(name, version)


def unpromoted_refusal(ports: Ports, name: str, version: int) -> str | None:
    """Why an operator may not make ``version`` desired because it is the candidate of a
    release that has not been promoted (only its canaries may serve it), or None. The store
    refuses it too, but only at the commit: by then this node would have deployed it."""
    releases = book(ports)
    r = releases.get(name) if releases is not None else None
    if r is None or r.version != version or r.state not in (core.State.ISSUED, core.State.CANARY):
        return None
    return (f"{name}: version {version} is the candidate of a release at its {r.state.value} step and was never "
            f"promoted; only the release's canaries may serve it. Let the release promote it to every node or "
            f"abort it (`certd status --fleet` shows where it is), or `certd release hold {name}` to keep it from "
            f"being promoted")


def bad_refusal(ports: Ports, name: str, version: int) -> str | None:
    """Why ``version`` may not be rolled back to (marked bad by a release), or None."""
    releases = book(ports)
    why = releases.bad(name, version) if releases is not None else None
    return f"{name}: {why}; choose another version" if why else None


class FleetRollbackEffects:
    """A fleet rollback's rotation effects: those of this node, but its commit moves desired
    back, marks the version left bad (S3) and ends a release of it in one transaction
    (:meth:`certd.store.pgrelease.ReleaseBook.roll_back`). A crash after the commit leaves
    nothing half-done; one before it resumes the journal, which commits the same way."""

    def __init__(self, effects: Effects, releases: ReleaseStore, j: Journal, clock: Clock) -> None:
        self._effects, self._releases, self._j, self._clock = effects, releases, j, clock

    def stage(self, version: int) -> None:
        self._effects.stage(version)

    def switch(self, version: int) -> None:
        self._effects.switch(version)

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        return self._effects.reload(version, keep_going=keep_going)

    def verify(self, version: int) -> bool:
        return self._effects.verify(version)

    def commit(self, version: int) -> None:
        assert self._j.from_version is not None
        self._releases.roll_back(self._j.name, self._j.from_version, version, rolled_back_by(self._j.initiator),
                                 self._clock.now())


def rotation_effects(ports: Ports, cert: CertificateConfig, j: Journal, effects: Effects) -> Effects:
    """``effects`` for driving ``j``: a fleet rollback's commit is the fleet's (above)."""
    releases = book(ports)
    if releases is None or j.kind != "rollback" or j.from_version is None:
        return effects
    return FleetRollbackEffects(effects, releases, j, ports.clock)


def rolled_back_by(initiator: str) -> str:
    return f"rolled back fleet-wide by {initiator}"


def fleet_rollback_done(ports: Ports, cert: CertificateConfig, left: int, to: int, initiator: str,
                        reason: str) -> None:
    """An operator's rollback committed in a fleet (desired moved from ``left`` to ``to``, the
    version left marked bad by the same commit): audited as the fleet's."""
    if book(ports) is None:
        return
    ports.emit("fleet_rollback", cert.name, initiator=initiator, reason=reason, version=to,
               detail={"from_version": left, "marked_bad": left})
    event(log, "fleet_rollback", logging.WARNING, name=cert.name, from_version=left, version=to, initiator=initiator)
