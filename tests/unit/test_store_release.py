"""Fleet releases on PostgreSQL (certd/store/pgrelease.py): fenced transitions with their effect
in the same transaction, S3 at the store (a bad or unpromoted version never becomes desired),
holds, reports and the 2 -> 3 -> 4 schema upgrade. On a private cluster (tests/support/postgres.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from certd.core.clock import FakeClock
from certd.core.errors import StoreError
from certd.core.release import Effect, Report, State, open_release
from certd.crypto.custody import FileKek, KeyRing
from certd.store.port import Fenced
from tests.support.certs import make_bundle

psycopg = pytest.importorskip("psycopg")
from certd.store.pg import PgStore  # noqa: E402
from certd.store.pgschema import DDL, UPGRADES, VERSION  # noqa: E402

TTL = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc))


@pytest.fixture
def store(postgres, clock):
    s = PgStore(postgres, node="node1", keyring=KeyRing(FileKek(bytes(range(32)), "kek")), clock=clock)
    yield s
    s.close()


def _two_versions(s: PgStore) -> None:
    lease = s.lease("www", "a", TTL)
    for _ in range(2):
        s.add_version("www", make_bundle(), {}, lease=lease)
    s.set_desired("www", 1, lease=lease)
    s.release(lease)


def test_a_release_version_moves_desired_only_by_its_promotion(store, clock):
    """Before promotion nobody can make the release's version desired; promotion moves it, fenced."""
    _two_versions(store)
    lease = store.lease("www", "a", TTL)
    r = open_release("www", 2, 1, clock.now())
    store.releases.open(r, lease=lease)
    with pytest.raises(StoreError, match="still issued"):
        store.releases.open(r, lease=lease)  # one release at a time
    with pytest.raises(StoreError, match="only its promotion"):
        store.set_desired("www", 2, lease=lease)
    canary = replace(r, state=State.CANARY, canaries=("node2",))
    store.releases.record(canary, Effect.NONE, lease=lease)
    store.releases.record(replace(canary, state=State.PROMOTED), Effect.PROMOTE, lease=lease)
    assert store.desired("www") == 2 and store.releases.get("www").state == State.PROMOTED


def test_a_stale_lease_cannot_move_a_release(store, clock):
    """A node that lost the lease cannot promote, abort or roll back: the write is fenced."""
    _two_versions(store)
    old = store.lease("www", "a", 0.0)
    store.releases.open(open_release("www", 2, 1, clock.now()), lease=old)
    store.lease("www", "b", TTL)  # taken over after expiry
    with pytest.raises(Fenced):
        store.releases.record(replace(open_release("www", 2, 1, clock.now()), state=State.PROMOTED), Effect.PROMOTE,
                              lease=old)
    assert store.desired("www") == 1 and store.releases.get("www").state == State.ISSUED


@pytest.mark.parametrize("state,effect,desired", [(State.ABORTED, Effect.ABORT, 1),
                                                  (State.FLEET_ROLLED_BACK, Effect.ROLL_BACK, 1)])
def test_an_aborted_or_rolled_back_version_is_bad_for_good(store, clock, state, effect, desired):
    """Abort and fleet rollback mark the version bad: desired is (back) on the previous one and refuses it."""
    _two_versions(store)
    lease = store.lease("www", "a", TTL)
    r = open_release("www", 2, 1, clock.now())
    store.releases.open(r, lease=lease)
    if effect == Effect.ROLL_BACK:
        store.releases.record(replace(r, state=State.PROMOTED), Effect.PROMOTE, lease=lease)
        assert store.desired("www") == 2
    store.releases.record(replace(r, state=state, reason="node3: reload failed"), effect, lease=lease)
    assert store.desired("www") == desired
    assert store.releases.bad("www", 2) == "version 2 is marked bad: node3: reload failed"
    assert store.releases.bad("www", 1) is None
    with pytest.raises(StoreError, match="marked bad"):
        store.set_desired("www", 2, lease=lease)


def test_holds_reports_live_nodes_and_status(store, clock):
    """Holds and reports are rows of their own; status shows the release, its canaries and the hold."""
    _two_versions(store)
    assert store.releases.status(["www"]) == {"www": None}
    store.releases.hold("www", "uid=0(root)")
    assert store.releases.held("www") and store.releases.status(["www"])["www"]["state"] is None
    store.releases.open(replace(open_release("www", 2, 1, clock.now()), state=State.CANARY, canaries=("node2",)))
    store.releases.report("www", 2, "node2", False, "verify failed")
    store.releases.report("www", 2, "node2", True, None)
    assert store.releases.reports("www", 2) == {"node2": Report(True, None)}
    row = store.releases.status(["www"])["www"]
    assert (row["state"], row["canaries"], row["held"], row["held_by"]) == ("canary", ["node2"], True, "uid=0(root)")
    assert store.releases.resume("www") and not store.releases.resume("www")
    store.fleet.heartbeat("node1", "t")
    assert store.releases.live_nodes(60) == ["node1"]
    clock.advance(61)
    assert store.releases.live_nodes(60) == []


def test_a_version_2_database_is_upgraded_through_3_to_4(postgres, clock):
    """A database of the first fleet release's schema 2 gains the release tables; its rows stay."""
    with psycopg.connect(postgres) as conn:
        conn.execute("CREATE TABLE certd_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
        conn.execute(DDL)
        conn.execute(UPGRADES[2])
        conn.execute("INSERT INTO certd_schema VALUES (1, 2)")
        conn.execute("INSERT INTO certd_desired VALUES ('www', 3)")
    s = PgStore(postgres, node="node1", keyring=KeyRing(FileKek(bytes(range(32)), "kek")), clock=clock)
    try:
        assert s.desired("www") == 3 and s.releases.get("www") is None
        with psycopg.connect(postgres) as conn:
            assert conn.execute("SELECT version FROM certd_schema").fetchall() == [(VERSION,)] and VERSION >= 4
    finally:
        s.close()
