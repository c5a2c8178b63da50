"""A fleet release: how one new version of a certificate reaches the fleet, in steps.

With ``[certificate.rollout]`` a renewal in a fleet stores the new version and opens a release
instead of moving the desired version at once::

    issued -> canary -> promoted -> fleet -> done
                 |                    |
                 v                    v
              aborted          fleet_rolled_back

- ``issued``: the version is stored; no node deploys it. The next step picks the canaries
  among the live nodes (a count: the first N by name that have verify endpoints for the
  certificate — a *hollow* canary proves nothing clients see — hollow ones only when no live
  node verifies; names: those, a named node that is not live replaced by the first live node
  that is not named), or waits while no node is live.
- ``canary``: the canaries deploy, reload and verify the version (the rest of the fleet keeps
  the desired, previous one). One canary failing aborts; a canary that stops heartbeating
  before it reported is replaced by another live node (never waited for: a renewal that is due
  must not hang on one dead host); no verdict within ``fleet_timeout`` aborts too.
- ``promoted``: every canary proved the version by handshake: the desired version moves to it.
- ``fleet``: every other node follows. Failures beyond ``max_failed_nodes`` roll the whole fleet
  back (desired back to the previous version; each node proves it by handshake); within it the
  failing node stays on the previous version and is named in the release. ``done`` when every
  live node reported, or at ``fleet_timeout`` (the silent nodes are named; they converge when
  they come back, as any node does).
- ``aborted`` / ``fleet_rolled_back``: the version is marked bad; no node deploys it again.
  A version that may not be deployed any more before its promotion (revoked, its key
  compromised: :attr:`Facts.refusal`) aborts, whatever its canaries said and even while held.

A **hold** (``certd release hold``) is a fact given to :func:`advance`, not a state: it stops the
steps that widen a release (promotion, fleet, done) but never the ones that protect the fleet
(abort, fleet rollback); a held release still goes as far as its canaries, which touch only
themselves. Pure: no I/O, the time is given.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any


class State(str, enum.Enum):
    ISSUED = "issued"
    CANARY = "canary"
    PROMOTED = "promoted"
    FLEET = "fleet"
    DONE = "done"
    ABORTED = "aborted"
    FLEET_ROLLED_BACK = "fleet_rolled_back"


TERMINAL = frozenset({State.DONE, State.ABORTED, State.FLEET_ROLLED_BACK})
SUPERSEDED = "superseded"  # the reason's first word when desired moved outside the release
BAD = "release_bad"  # a version's meta key once a release marked it bad: {"state", "reason"}


def bad_reason(meta: Mapping[str, Any]) -> str | None:
    """Why a version with ``meta`` was marked bad (S3: never deployed again), or None."""
    mark = meta.get(BAD)
    if not mark:
        return None
    return str(mark.get("reason") or mark.get("state") or "marked bad") if isinstance(mark, Mapping) else "marked bad"


class Effect(str, enum.Enum):
    """What the store must do in the transaction that records a transition."""

    NONE = "none"
    PROMOTE = "promote"      # desired := the release's version
    ABORT = "abort"          # the version is marked bad (desired never moved)
    ROLL_BACK = "roll_back"  # desired := the previous version; the version is marked bad


@dataclass(frozen=True)
class Rollout:
    """``[certificate.rollout]``: canaries as a count or node names; durations in seconds."""

    canaries: int | tuple[str, ...] = 1
    max_failed_nodes: int = 0
    fleet_timeout: float = 600.0


@dataclass(frozen=True)
class Report:
    """One node's outcome of deploying the release's version (reload and handshake)."""

    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Facts:
    """What the driving node sees: the live nodes, their reports on the version, the hold."""

    live: Sequence[str]
    reports: Mapping[str, Report] = field(default_factory=dict)
    held: bool = False
    desired: int | None = None   # the desired version now (None: not known, not checked)
    refusal: str | None = None   # why the release's version may not be deployed now (revoked, key compromised)
    hollow: frozenset[str] = frozenset()  # nodes with no verify endpoints for it: a canary there proves nothing


@dataclass(frozen=True)
class Release:
    name: str
    version: int
    previous: int | None
    state: State
    opened_at: datetime
    since: datetime                       # when ``state`` was entered
    canaries: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()          # nodes that failed the version (and stayed on the previous)
    reason: str = ""                      # why the last transition happened

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "previous": self.previous, "state": self.state.value,
                "opened_at": self.opened_at.isoformat(), "since": self.since.isoformat(),
                "canaries": list(self.canaries), "failed": list(self.failed), "reason": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Release:
        return cls(d["name"], int(d["version"]), d.get("previous"), State(d["state"]),
                   datetime.fromisoformat(d["opened_at"]), datetime.fromisoformat(d["since"]),
                   tuple(d.get("canaries", ())), tuple(d.get("failed", ())), d.get("reason", ""))


@dataclass(frozen=True)
class Transition:
    release: Release
    effect: Effect = Effect.NONE


def open_release(name: str, version: int, previous: int | None, now: datetime) -> Release:
    return Release(name, version, previous, State.ISSUED, now, now, reason="stored; waiting for canaries")


def pick_canaries(want: int | tuple[str, ...], live: Sequence[str], exclude: Sequence[str] = (),
                  hollow: Collection[str] = ()) -> tuple[str, ...]:
    """The canaries among ``live`` (see the module's text); () if no live node can be one.
    Picked by count, a ``hollow`` node (no verify endpoints for the certificate: its canary
    run would prove the reload only, never what clients get) is skipped — unless no live node
    can verify at all, where the canaries prove what they can, as before."""
    pool = sorted(n for n in live if n not in exclude)
    if isinstance(want, int):
        proving = [n for n in pool if n not in hollow]
        return tuple((proving or pool)[:want])
    named = [n for n in want if n in pool]
    spare = [n for n in pool if n not in want]
    return tuple(named + spare[:len(want) - len(named)])


def _to(r: Release, state: State, now: datetime, reason: str, **kw: Any) -> Release:
    return replace(r, state=state, since=now, reason=reason, **kw)


def advance(r: Release, facts: Facts, rollout: Rollout, now: datetime) -> Transition | None:
    """The release's next step given ``facts``, or None while nothing changes."""
    if r.finished:
        return None
    timed_out = (now - r.since).total_seconds() >= rollout.fleet_timeout
    superseded = _superseded(r, facts, now)
    if superseded is not None:
        return superseded
    if facts.refusal is not None and r.state in (State.ISSUED, State.CANARY):
        # revoked or compromised before its promotion: it must never reach the fleet (S3)
        return Transition(_to(r, State.ABORTED, now, f"version {r.version} may not be deployed: {facts.refusal}"),
                          Effect.ABORT)
    if r.state == State.ISSUED:
        return _issued(r, facts, rollout, now, timed_out)
    if r.state == State.CANARY:
        return _canary(r, facts, now, timed_out)
    return _fleet(r, facts, rollout, now, timed_out)


def _superseded(r: Release, facts: Facts, now: datetime) -> Transition | None:
    """The desired version moved outside the release (a revocation's re-key, an operator's
    rollback): before promotion the release aborts (its version must not come back later),
    after it the release is over."""
    if facts.desired is None:
        return None
    if r.state in (State.ISSUED, State.CANARY) and facts.desired != r.previous:
        return Transition(_to(r, State.ABORTED, now, f"{SUPERSEDED}: version {facts.desired} was made desired "
                                                     "outside the release"), Effect.ABORT)
    if r.state in (State.PROMOTED, State.FLEET) and facts.desired != r.version:
        return Transition(_to(r, State.DONE, now, f"{SUPERSEDED}: version {facts.desired} was made desired "
                                                  "outside the release"))
    return None


def _issued(r: Release, facts: Facts, rollout: Rollout, now: datetime, timed_out: bool) -> Transition | None:
    if rollout.canaries == 0:  # no canary step: straight to the fleet (unless held)
        return None if facts.held else Transition(_to(r, State.PROMOTED, now, "no canaries configured"),
                                                  Effect.PROMOTE)
    canaries = pick_canaries(rollout.canaries, facts.live, hollow=facts.hollow)
    if canaries:
        return Transition(_to(r, State.CANARY, now, f"canaries {', '.join(canaries)}", canaries=canaries))
    if timed_out:
        return Transition(_to(r, State.ABORTED, now, "no live node to be a canary within fleet_timeout"),
                          Effect.ABORT)
    return None


def _canary(r: Release, facts: Facts, now: datetime, timed_out: bool) -> Transition | None:
    for node in r.canaries:
        report = facts.reports.get(node)
        if report is not None and not report.ok:
            return Transition(_to(r, State.ABORTED, now, f"canary {node} failed: {report.error}", failed=(node,)),
                              Effect.ABORT)
    if all(facts.reports.get(n, Report(False)).ok for n in r.canaries):
        if facts.held:
            return None
        return Transition(_to(r, State.PROMOTED, now, f"verified on canaries {', '.join(r.canaries)}"),
                          Effect.PROMOTE)
    if timed_out:
        silent = [n for n in r.canaries if n not in facts.reports]
        return Transition(_to(r, State.ABORTED, now, f"canaries {', '.join(silent)} did not verify within "
                                                     "fleet_timeout"), Effect.ABORT)
    gone = [n for n in r.canaries if n not in facts.reports and n not in facts.live]
    if not gone:
        return None
    kept = [n for n in r.canaries if n not in gone]
    extra = pick_canaries(len(gone), facts.live, exclude=[*kept, *facts.reports], hollow=facts.hollow)
    if not extra:
        return None  # nobody to replace them with: wait (the timeout ends it)
    canaries = tuple(kept) + extra
    return Transition(replace(r, canaries=canaries, reason=f"canary {', '.join(gone)} down: replaced by "
                                                           f"{', '.join(extra)}"))


def _fleet(r: Release, facts: Facts, rollout: Rollout, now: datetime, timed_out: bool) -> Transition | None:
    failed = tuple(sorted(n for n, rep in facts.reports.items() if not rep.ok))
    if len(failed) > rollout.max_failed_nodes:
        errors = "; ".join(f"{n}: {facts.reports[n].error}" for n in failed)
        return Transition(_to(r, State.FLEET_ROLLED_BACK, now, f"{len(failed)} node(s) failed (max_failed_nodes = "
                              f"{rollout.max_failed_nodes}): {errors}", failed=failed), Effect.ROLL_BACK)
    if failed != r.failed:
        return Transition(replace(r, failed=failed, reason=f"node(s) {', '.join(failed)} failed and stayed on "
                                                           f"version {r.previous} (within max_failed_nodes)"))
    if facts.held:
        return None
    if r.state == State.PROMOTED:
        return Transition(_to(r, State.FLEET, now, "the fleet follows"))
    pending = [n for n in facts.live if n not in facts.reports]
    if not pending:
        return Transition(_to(r, State.DONE, now, "every live node reported" + _failed_note(failed)))
    if timed_out:
        return Transition(_to(r, State.DONE, now, f"fleet_timeout: no report yet from {', '.join(sorted(pending))}"
                                                  + _failed_note(failed)))
    return None


def _failed_note(failed: tuple[str, ...]) -> str:
    return f"; failed and kept the previous version: {', '.join(failed)}" if failed else ""


def live_window(reconcile_interval: float) -> float:
    """Seconds since its last heartbeat within which a node counts as live (releases, and a
    keyCompromise's completion): three passes (a pass may spend a reload and a verify_timeout
    per certificate) and a margin."""
    return 3 * reconcile_interval + 10
