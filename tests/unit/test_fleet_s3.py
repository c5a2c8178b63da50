"""S3 on one fleet node (certd/daemon/fleet.py, certd/engine/rollback.py): whatever a node
deploys or falls back to, and whatever an operator rolls the fleet back to, is a version that
may be deployed — not marked bad by a release, not revoked, its key not compromised, not a
release candidate its canaries have not promoted. One node on a private PostgreSQL cluster
(tests/support/postgres.py), its certificate deployed to a real live directory, its reload a
command that fails while ``failreload`` exists."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, DeployConfig, ReloadHook
from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable, UsageError
from certd.core.events import EventBus, LifecycleEvent
from certd.core.release import Effect, Rollout, State, open_release
from certd.crypto.custody import FileKek, KeyRing
from certd.engine.lifecycle import Revocation, compromised_meta
from certd.engine.manager import Manager
from tests.support.certs import make_bundle

psycopg = pytest.importorskip("psycopg")
from certd.daemon.fleet import FleetNode  # noqa: E402
from certd.store.pg import PgStore  # noqa: E402

NOW = datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc)
TTL = 30.0


@dataclass
class Node:
    """One fleet node: its store, its FleetNode, its certificate and what it audited."""

    store: PgStore
    fleet: FleetNode
    cert: CertificateConfig
    live: Path
    fail: Path
    events: list[LifecycleEvent]
    clock: FakeClock

    def serving(self) -> int:
        """The version the live link names (what the server reads at its next reload)."""
        return int(self.live.readlink().name)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture
def node(postgres: str, tmp_path: Path):
    clock = FakeClock(NOW)
    store = PgStore(postgres, node="node1", keyring=KeyRing(FileKek(bytes(range(32)), "kek")), clock=clock)
    live, fail = tmp_path / "ssl" / "www", tmp_path / "failreload"
    cert = CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(live_dir=live),
                             reload=(ReloadHook("command", command=("/bin/sh", "-c", f"[ ! -e {fail} ]")),))
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                    AcmeConfig("https://127.0.0.1:14000/dir"), (cert,))
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    manager = Manager(config, store=store, clock=clock, events=bus)
    lease = store.lease("www", "a", TTL)
    for _ in range(2):
        store.add_version("www", make_bundle(), {}, lease=lease)
    store.set_desired("www", 1, lease=lease)
    store.release(lease)
    fleet = FleetNode(manager, store, lambda: config, threading.Event())
    fleet.apply(cert, 1, None)
    yield Node(store, fleet, cert, live, fail, seen, clock)
    store.close()


def _abort_release_of_2(n: Node) -> None:
    """A release of version 2 reached this node as a canary, then aborted: 2 is marked bad."""
    lease = n.store.lease("www", "driver", TTL)
    r = replace(open_release("www", 2, 1, n.clock.now()), state=State.CANARY, canaries=("node1",))
    n.store.releases.open(r, lease=lease)
    n.fleet.apply(n.cert, 2, 1)  # the canary deploys it
    assert n.serving() == 2
    n.store.releases.record(replace(r, state=State.ABORTED, reason="canary node2 failed"), Effect.ABORT, lease=lease)
    n.store.release(lease)


def _make_undeployable(n: Node, how: str) -> None:
    """Version 2, applied on this node, becomes a version that must never be deployed again."""
    if how == "bad":
        _abort_release_of_2(n)
        return
    n.fleet.apply(n.cert, 2, 1)
    assert n.serving() == 2
    lease = n.store.lease("www", "op", TTL)
    meta = compromised_meta() if how == "compromised" else Revocation.of("superseded", None, "root").to_meta()
    n.store.update_meta("www", 2, meta, lease=lease)
    n.store.release(lease)


@pytest.mark.parametrize("how", ["bad", "revoked", "compromised"])
def test_a_failed_apply_never_switches_back_to_a_version_that_may_not_be_deployed(node: Node, how: str) -> None:
    """Going back to version 1 fails its reload: the node does not switch back to version 2
    (bad / revoked / compromised); version 1 stays in place, and the report and the audit say so."""
    _make_undeployable(node, how)
    node.fail.touch()
    node.fleet.apply(node.cert, 1, 2)
    assert node.serving() == 1
    refused = [e for e in node.events if e.kind == "node_switch_back_refused"]
    assert len(refused) == 1 and refused[0].version == 2 and refused[0].initiator == "node=node1"
    error = _last_error(node)
    assert "not switched back to version 2" in error and "version 1 stays in place" in error


def test_a_failed_apply_switches_back_to_a_good_previous_version(node: Node) -> None:
    """The ordinary case is unchanged: version 2's reload fails, the node is back on version 1."""
    node.fail.touch()
    node.fleet.apply(node.cert, 2, 1)
    assert node.serving() == 1 and "node_switch_back_refused" not in node.kinds()


def _last_error(n: Node) -> str:
    with psycopg.connect(n.store.dsn) as conn:
        row = conn.execute("SELECT last_error FROM certd_node_reports WHERE node = 'node1' AND name = 'www'").fetchone()
    return row[0] or ""


def _open_canary_release_of_2(n: Node) -> None:
    """A release of version 2 at its canary step, on another node: 2 was never promoted."""
    lease = n.store.lease("www", "driver", TTL)
    r = replace(open_release("www", 2, 1, n.clock.now()), state=State.CANARY, canaries=("node2",))
    n.store.releases.open(r, lease=lease)
    n.store.release(lease)


@pytest.mark.parametrize("how,why", [("candidate", "never promoted.*certd release hold www"),
                                     ("bad", "marked bad.*canary node2 failed")])
def test_a_fleet_rollback_refuses_an_unpromoted_candidate_or_a_bad_version(node: Node, how: str, why: str) -> None:
    """`certd rollback www --to 2` with 2 only on canaries (or aborted) is refused before anything
    is deployed: a clear error says why and what to do; desired and the live link stay on 1."""
    if how == "candidate":
        _open_canary_release_of_2(node)
    else:
        _abort_release_of_2(node)
        node.fleet.apply(node.cert, 1, 2)  # the canary went back to the desired version
    before = len(node.events)
    with pytest.raises(UsageError, match=why):
        node.fleet.manager.rollback(node.cert, to_version=2, initiator="uid=0(root)")
    assert node.store.desired("www") == 1 and node.serving() == 1
    assert "deployed" not in node.kinds()[before:]


def _turn_bad_without_deploying(n: Node, how: str) -> None:
    """Version 2 becomes undeployable after the node decided to apply it, before it stages."""
    lease = n.store.lease("www", "driver", TTL)
    if how == "bad":
        r = replace(open_release("www", 2, 1, n.clock.now()), state=State.CANARY, canaries=("node1",))
        n.store.releases.open(r, lease=lease)
        n.store.releases.record(replace(r, state=State.ABORTED, reason="canary node2 failed"), Effect.ABORT,
                                lease=lease)
    else:
        n.store.update_meta("www", 2, Revocation.of("keyCompromise", None, "root").to_meta(), lease=lease)
    n.store.release(lease)


@pytest.mark.parametrize("how", ["bad", "revoked"])
def test_apply_checks_again_right_before_staging(node: Node, how: str) -> None:
    """The node read version 2 as its target; 2 turns bad (or revoked) before the apply stages:
    nothing is deployed, the node keeps version 1 and reports why."""
    _turn_bad_without_deploying(node, how)
    before = len(node.events)
    node.fleet.apply(node.cert, 2, 1)
    assert node.serving() == 1 and node.store.applied("node1", "www") == 1
    assert "node_applied" not in node.kinds()[before:]
    assert "not applying version 2" in _last_error(node)


def test_a_fleet_rollback_moves_desired_and_marks_the_version_left_bad_together(node: Node) -> None:
    """`certd rollback www` from 2 to 1: the moment desired is back on 1 (the rotation's commit),
    version 2 is already bad and its release over — a crash right after the commit cannot leave
    2 promotable again. Observed at the rollback's own audit event, which follows the commit."""
    lease = node.store.lease("www", "driver", TTL)
    r = open_release("www", 2, 1, node.clock.now())
    node.store.releases.open(r, lease=lease)
    node.store.releases.record(replace(r, state=State.PROMOTED), Effect.PROMOTE, lease=lease)
    node.store.releases.record(replace(r, state=State.FLEET), Effect.NONE, lease=lease)
    node.store.release(lease)
    node.fleet.apply(node.cert, 2, 1)
    at_commit: list[tuple[int | None, str | None, State]] = []

    def look(e: LifecycleEvent) -> None:
        if e.kind == "operator_rollback":
            at_commit.append((node.store.desired("www"), node.store.releases.bad("www", 2),
                              node.store.releases.get("www").state))
    node.fleet.manager.events.subscribe(look)
    outcome = node.fleet.manager.rollback(node.cert, initiator="uid=0(root)")
    assert (outcome.ok, outcome.version, node.serving()) == (True, 1, 1)
    desired, bad, state = at_commit[0]
    assert desired == 1 and bad is not None and "rolled back fleet-wide by uid=0(root)" in bad
    assert state == State.FLEET_ROLLED_BACK
    assert "fleet_rollback" in node.kinds()


def test_the_driver_aborts_a_release_whose_candidate_was_compromised_in_canary(node: Node) -> None:
    """Version 2's canary verified it, then its key was reported compromised: the driver aborts
    the release (2 marked bad, release_aborted audited) instead of promoting it; desired stays 1."""
    cert = replace(node.cert, rollout=Rollout(canaries=1))
    node.store.fleet.heartbeat("node1", "test")
    node.fleet.releases.publish([cert])  # as each reconcile pass does: node1 releases www
    lease = node.store.lease("www", "opener", TTL)
    node.store.releases.open(open_release("www", 2, 1, node.clock.now()), lease=lease)
    node.store.release(lease)
    node.fleet.releases.drive(cert)  # issued -> canary: node1, the only live node
    assert node.store.releases.get("www").canaries == ("node1",)
    node.fleet.apply(cert, 2, 1)     # the canary deploys and verifies it (reported ok)
    lease = node.store.lease("www", "op", TTL)
    node.store.update_meta("www", 2, compromised_meta(), lease=lease)
    node.store.release(lease)
    node.fleet.releases.drive(cert)
    r = node.store.releases.get("www")
    assert (r.state, node.store.desired("www")) == (State.ABORTED, 1) and "compromised key" in r.reason
    assert node.store.releases.bad("www", 2) is not None and "release_aborted" in node.kinds()


def test_a_node_without_verify_endpoints_is_not_picked_as_a_canary_by_count(node: Node) -> None:
    """node1 has no [[certificate.verify]] for www (it says so each pass), node2 has: with
    canaries = 1 the release's canary is node2, though node1 comes first by name."""
    cert = replace(node.cert, rollout=Rollout(canaries=1))
    for name in ("node1", "node2"):
        node.store.fleet.heartbeat(name, "test")
    node.fleet.releases.publish([cert])
    node.store.releases.publish_verifies("node2", {"www": True})
    lease = node.store.lease("www", "opener", TTL)
    node.store.releases.open(open_release("www", 2, 1, node.clock.now()), lease=lease)
    node.store.release(lease)
    node.fleet.releases.drive(cert)
    assert node.store.releases.get("www").canaries == ("node2",)


def test_a_node_that_failed_a_promoted_version_tries_it_again_once_the_release_is_over(node: Node) -> None:
    """L1: within ``max_failed_nodes`` a node whose apply of the promoted version failed stays on
    the previous one while the release runs (its report stands, no flapping), and tries again
    once the release is over — not only at the next renewal, by when the previous version may
    have expired (a 90-day certificate renewed at day 60 leaves the old one 30 days)."""
    cert = replace(node.cert, rollout=Rollout(canaries=0, max_failed_nodes=1))
    lease = node.store.lease("www", "driver", TTL)
    r = open_release("www", 2, 1, node.clock.now())
    node.store.releases.open(r, lease=lease)
    node.store.releases.record(replace(r, state=State.PROMOTED), Effect.PROMOTE, lease=lease)
    node.store.releases.record(replace(r, state=State.FLEET), Effect.NONE, lease=lease)
    node.fail.touch()
    node.fleet.apply(cert, 2, 1)
    assert node.serving() == 1
    assert node.fleet.releases.target(cert, 2, 1) is None  # while the release runs: stays on 1
    node.store.releases.record(replace(r, state=State.DONE, failed=("node1",)), Effect.NONE, lease=lease)
    node.store.release(lease)
    node.fail.unlink()
    assert node.fleet.releases.target(cert, 2, 1) == 2
    node.fleet.apply(cert, 2, 1)
    assert node.serving() == 2 and node.store.applied("node1", "www") == 2


def test_a_node_that_does_not_release_the_certificate_is_neither_canary_nor_awaited(node: Node) -> None:
    """node0 is live but its configuration has no www with a rollout table (or dropped it):
    it never deploys a candidate nor reports, so it is not picked as a canary (it comes first
    by name) and the fleet step does not wait for its report — as a canary it aborted every
    release at fleet_timeout, and in the fleet step it held the release short of done."""
    cert = replace(node.cert, rollout=Rollout(canaries=1, fleet_timeout=600))
    node.store.releases.publish_verifies("node0", {"www": True})  # it had www once ...
    node.store.releases.publish_verifies("node0", {})  # ... and dropped it
    for name in ("node0", "node1"):
        node.store.fleet.heartbeat(name, "test")
    node.fleet.releases.publish([cert])
    lease = node.store.lease("www", "opener", TTL)
    node.store.releases.open(open_release("www", 2, 1, node.clock.now()), lease=lease)
    node.store.release(lease)
    node.fleet.releases.drive(cert)
    assert node.store.releases.get("www").canaries == ("node1",)
    node.fleet.apply(cert, 2, 1)  # the canary deploys and reports
    node.fleet.releases.drive(cert)  # promoted -> fleet -> done: node0 is not awaited
    r = node.store.releases.get("www")
    assert r.state == State.DONE and node.store.desired("www") == 2


def test_a_canary_that_cannot_reach_the_database_does_not_fail_the_release(node: Node, monkeypatch) -> None:
    """The database out of reach while a canary applies says nothing about the version: no
    failure is reported to the release (it would abort and mark a good version bad — the
    releases soak saw a 6 s PostgreSQL restart do that to 16 versions); the next try reports."""
    cert = replace(node.cert, rollout=Rollout(canaries=1))
    lease = node.store.lease("www", "driver", TTL)
    r = replace(open_release("www", 2, 1, node.clock.now()), state=State.CANARY, canaries=("node1",))
    node.store.releases.open(r, lease=lease)
    node.store.release(lease)
    real = node.store.load

    def unreachable(*args, **kw):
        raise StoreUnreachable("PostgreSQL store: database unreachable: no connection within 5 s")
    monkeypatch.setattr(node.store, "load", unreachable)
    node.fleet.apply(cert, 2, 1)
    assert node.serving() == 1 and node.store.releases.reports("www", 2) == {}
    monkeypatch.setattr(node.store, "load", real)
    node.fleet.apply(cert, 2, 1)
    assert node.serving() == 2 and node.store.releases.reports("www", 2)["node1"].ok



def test_a_pass_drives_only_the_releases_that_changed_and_sweeps_them_all_each_interval(node: Node) -> None:
    """A release waiting for its canary's report is not driven again at every pass (a lease and
    ~10 queries each: under a wave of 50 a release moved one step per pass), only once its report
    (or any notified write) changed it; the sweep each reconcile interval (30 s here) still drives
    it, so fleet_timeout aborts a release whose canary never reports."""
    cert = replace(node.cert, rollout=Rollout(canaries=1, fleet_timeout=10))
    node.store.fleet.heartbeat("node1", "test")
    node.fleet.releases.publish([cert])
    drive = node.fleet.releases.drive_due
    lease = node.store.lease("www", "opener", TTL)
    node.store.releases.open(open_release("www", 2, 1, node.clock.now()), lease=lease)
    node.store.release(lease)
    assert drive([cert]) == ({"www"}, False)   # the first pass sweeps: issued -> canary node1
    assert node.store.releases.get("www").state == State.CANARY
    assert drive([cert]) == ({"www"}, False)   # the step it recorded moved the mark: once more
    assert drive([cert]) == (set(), False)     # nothing changed since: not driven
    node.fleet.apply(cert, 2, 1)               # the canary reports
    assert drive([cert]) == ({"www"}, False)
    assert node.store.releases.get("www").state == State.DONE

    lease = node.store.lease("www", "opener", TTL)
    node.store.add_version("www", make_bundle(), {}, lease=lease)
    node.store.releases.open(open_release("www", 3, 2, node.clock.now()), lease=lease)
    node.store.release(lease)
    node.store.fleet.heartbeat("node2", "test")
    node.store.releases.publish_verifies("node2", {"www": True})  # node2 proves it: the canary, silent
    assert drive([cert]) == ({"www"}, False) and node.store.releases.get("www").canaries == ("node2",)
    drive([cert])
    node.clock.advance(11)                     # past fleet_timeout: nothing notified, not driven yet
    assert drive([cert]) == (set(), False) and node.store.releases.get("www").state == State.CANARY
    node.clock.advance(20)                     # the sweep
    assert drive([cert]) == ({"www"}, False)
    r = node.store.releases.get("www")
    assert r.state == State.ABORTED and "did not verify within fleet_timeout" in r.reason
