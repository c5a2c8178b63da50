"""A fleet node's part in releases (``[certificate.rollout]``; certd/core/release.py).

**Who drives.** Every node, on each reconcile pass, tries the certificate's lease without
waiting; the one that gets it reads the release, the live nodes and their reports, asks
:func:`certd.core.release.advance` for the next step and records it fenced by that lease, with
its effect (moving desired, marking the version bad) in the same transaction. A node that does
not get the lease skips: someone else is driving, or renewing. So any live node can finish a
release whose opener died, and a node cut off from the database cannot move it.

**Which releases a pass drives** (:meth:`ReleaseDriver.drive_due`): those whose release row,
reports, hold, desired version or version marks changed since this node last drove them (one
query digests them all, :meth:`certd.store.pgrelease.ReleaseBook.marks`), those whose lease was
busy, and every unfinished one once a reconcile interval — the clock (``fleet_timeout``) and
which nodes are live change without a write. Driving every open release in turn at every pass
(a lease, ~10 queries each) made a pass under a wave of 50 releases so slow that a release
moved about one step per pass: canary -> fleet 42 s p50 in the fleet soak, 3.6 s alone.

**What a node deploys** (:meth:`ReleaseDriver.target`): the release's version while it is a
canary of a release at its canary step, else the desired version; never a version that may not
be deployed (:func:`certd.engine.releases.deploy_refusal`: marked bad, revoked, key compromised),
and not again, while its release runs, a version it already failed (it stays on the previous one, reported; the release
decides whether that rolls the fleet back). Each apply of the release's version is reported
(:meth:`ReleaseDriver.reported`): those reports are the release's input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from certd.config import CertificateConfig
from certd.core.errors import CertdError, LockBusy
from certd.core.release import SUPERSEDED, Facts, Release, State, Transition, advance, live_window
from certd.engine.manager import Manager
from certd.engine.releases import deploy_refusal
from certd.engine.rotations import Rotations
from certd.ops.log import event
from certd.store.pg import PgStore

log = logging.getLogger("certd.release")

_REPUBLISH = 20  # passes between two publish() writes of an unchanged configuration
_STEPS_PER_PASS = 3  # promoted -> fleet -> done can follow each other in one pass


class ReleaseDriver:
    """Drives and follows the releases of one node's certificates."""

    def __init__(self, manager: Manager, store: PgStore, interval: Callable[[], float]) -> None:
        self.manager, self.store, self.node, self._interval = manager, store, store.node, interval
        self._published: dict[str, bool] | None = None  # what publish() last said
        self._passes = 0  # since publish() last wrote
        self._driven: dict[str, str] = {}  # name -> the release's mark when this node last drove it
        self._sweep_at = float("-inf")  # monotonic time of the next drive of every unfinished release

    def live_within(self) -> float:
        """Seconds since its last heartbeat within which a node counts as live (:func:`live_window`)."""
        return live_window(self._interval())

    def drive_due(self, certs: Sequence[CertificateConfig]) -> tuple[set[str], bool]:
        """Drive the releases of ``certs`` that are due (the module's text): the names driven
        (their desired version may have moved) and whether a lease was busy (the caller looks
        again soon)."""
        rolled = {c.name: c for c in certs if c.rollout is not None}
        marks = self.store.releases.marks(sorted(rolled)) if rolled else {}
        now = self.manager.clock.monotonic()
        sweep = now >= self._sweep_at
        if sweep:
            self._sweep_at = now + self._interval()
        self._driven = {n: m for n, m in self._driven.items() if n in marks}  # finished ones are forgotten
        due = [n for n in sorted(marks) if sweep or self._driven.get(n) != marks[n]]
        busy = False
        for name in due:
            if self.drive(rolled[name]):
                busy = True
                self._driven.pop(name, None)  # driven again at the next pass
            else:
                # the mark read before driving: a step recorded now moves it, so the next pass
                # drives once more (the step after may be due at once)
                self._driven[name] = marks[name]
        return set(due), busy

    def drive(self, cert: CertificateConfig) -> bool:
        """Move ``cert``'s unfinished release on, if this node gets the lease now. True when
        the lease was busy: the caller looks again soon, since the report that wakes this pass
        may have reached the driver after it read the reports (three nodes reporting at once
        left a release a whole reconcile interval short of done)."""
        if cert.rollout is None:
            return False
        r = self.store.releases.get(cert.name)
        if r is None or r.finished:
            return False
        try:
            with self.store.locks.held(cert.name, 0):
                for _ in range(_STEPS_PER_PASS):
                    if not self._step(cert):
                        return False
        except LockBusy:
            return True  # another node drives (or renews) it now
        return False

    def _step(self, cert: CertificateConfig) -> bool:
        assert cert.rollout is not None
        releases = self.store.releases
        r = releases.get(cert.name)  # again, under the lease
        if r is None or r.finished:
            return False
        # the release's nodes: live ones whose configuration releases this certificate — a node
        # without it (or without its rollout table) never deploys a candidate nor reports, so as
        # a canary it aborted every release at fleet_timeout and in the fleet step held "done"
        members = releases.members(cert.name)
        live = releases.live_nodes(self.live_within())
        if members:  # none at all: a restored database not republished yet — every live node, as before
            live = [n for n in live if n in members]
        facts = Facts(live, releases.reports(cert.name, r.version),
                      releases.held(cert.name), self.store.desired(cert.name),
                      deploy_refusal(self.store, cert.name, r.version),  # revoked/compromised since it opened
                      releases.hollow(cert.name))
        t = advance(r, facts, cert.rollout, self.manager.clock.now())
        if t is None:
            return False
        releases.record(t.release, t.effect)  # fenced by the lease drive() holds
        self._emit(cert, r, t)
        return True

    def _emit(self, cert: CertificateConfig, before: Release, t: Transition) -> None:
        r = t.release
        kind = {State.ABORTED: "release_aborted", State.FLEET_ROLLED_BACK: "release_rolled_back"}.get(
            r.state, "release_step")
        bad = kind != "release_step"
        event(log, kind, logging.ERROR if bad else logging.INFO, name=r.name, version=r.version,
              state=r.state.value, previous_state=before.state.value, reason=r.reason, node=self.node)
        self.manager.emit(kind, r.name, initiator=f"node={self.node}", reason=r.reason,
                          outcome="failed" if bad else r.state.value, version=r.version,
                          detail={"node": self.node, "state": r.state.value, "from_state": before.state.value,
                                  "canaries": list(r.canaries), "failed": list(r.failed), "previous": r.previous,
                                  "effect": t.effect.value})
        if bad and not r.reason.startswith(SUPERSEDED):
            # the renewal failed after all: the scheduler backs off instead of ordering again at once
            rotations = Rotations(self.manager.ports, self.manager.planner)
            try:
                rotations.record_failure(cert, self.manager.planner.load_state(cert.name),
                                         f"release of version {r.version} {r.state.value}: {r.reason}",
                                         result=r.state.value, initiator=f"node={self.node}")
            except CertdError as e:
                event(log, "release_failure_not_recorded", logging.WARNING, name=r.name, error=str(e))

    def publish(self, certs: Sequence[CertificateConfig]) -> None:
        """Tell the fleet which certificates this node releases (has with a rollout table) and
        whether it can prove each by handshake (its verify endpoints): a release counts only
        its certificate's nodes, and canaries picked by count skip hollow ones. Said when it
        changed, and again every ``_REPUBLISH`` passes (a restored database forgets it)."""
        verifies = {c.name: bool(c.verify) for c in certs if c.rollout is not None}
        self._passes += 1
        if verifies != self._published or self._passes >= _REPUBLISH:
            self.store.releases.publish_verifies(self.node, verifies)
            self._published, self._passes = verifies, 0

    def target(self, cert: CertificateConfig, desired: int | None, applied: int | None) -> int | None:
        """The version this node should serve now (None: leave it as it is)."""
        if cert.rollout is None:
            return desired
        releases = self.store.releases
        r = releases.get(cert.name)
        if r is None:
            return desired
        want = r.version if r.state == State.CANARY and self.node in r.canaries else desired
        if want is None or want != r.version:
            return want if want is None or deploy_refusal(self.store, cert.name, want) is None else None
        mine = releases.reports(cert.name, r.version).get(self.node)
        if mine is not None and not mine.ok and applied != want and not r.finished:
            # failed it once: stays on the previous version (reported) while the release runs, no
            # flapping; once it is over the node tries again each pass like any failed apply (the
            # previous version may expire long before the next renewal)
            return None
        if deploy_refusal(self.store, cert.name, want) is not None:
            return None
        if mine is None and applied == want and not r.finished:
            releases.report(cert.name, want, self.node, True, None)  # applied before it could report
        return want

    def reported(self, cert: CertificateConfig, version: int, error: str | None) -> None:
        """This node's outcome of deploying ``version``, when that is the release's version."""
        if cert.rollout is None:
            return
        r = self.store.releases.get(cert.name)
        if r is not None and not r.finished and r.version == version:
            self.store.releases.report(cert.name, version, self.node, error is None, error)
