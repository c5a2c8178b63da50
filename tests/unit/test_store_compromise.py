"""keyCompromise across a fleet on PostgreSQL (certd/store/pgcompromise.py): per-node destruction
records, who still holds a key, the completion claimed exactly once with its audit record, and
the 4 -> 6 schema upgrade (5: the canaries' verify table). On a private cluster (tests/support/postgres.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from certd.core.clock import FakeClock
from certd.core.events import LifecycleEvent
from certd.crypto.custody import FileKek, KeyRing
from certd.engine.lifecycle import compromised_meta
from tests.support.certs import make_bundle

psycopg = pytest.importorskip("psycopg")
from certd.store.pg import PgStore  # noqa: E402
from certd.store.pgschema import DDL, UPGRADES, VERSION  # noqa: E402

TTL, LIVE = 30.0, 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc))


def _store(postgres: str, clock: FakeClock, node: str) -> PgStore:
    return PgStore(postgres, node=node, keyring=KeyRing(FileKek(bytes(range(32)), "kek")), clock=clock)


@pytest.fixture
def nodes(postgres, clock):
    stores = [_store(postgres, clock, f"node{i}") for i in (1, 2)]
    yield stores
    for s in stores:
        s.close()


def _compromised_then_rekeyed(s: PgStore) -> str:
    """Version 1 (its key marked compromised) and version 2 desired; both nodes applied 2."""
    lease = s.lease("www", "a", TTL)
    for _ in range(2):
        s.add_version("www", make_bundle(), {}, lease=lease)
    s.update_meta("www", 1, compromised_meta(), lease=lease)
    s.set_desired("www", 2, lease=lease)
    s.release(lease)
    for node in ("node1", "node2"):
        s.set_applied(node, "www", 2)
        s.fleet.heartbeat(node, "t")
    return s.load_info("www", 1).info.spki_sha256


def _event(c):
    return LifecycleEvent("key_compromise_complete", "www", datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc),
                          initiator="node=node1", spki_sha256=c.spki_sha256, detail={"nodes": list(c.nodes)})


def test_completion_waits_for_every_live_node_and_the_store_and_is_recorded_once(nodes, clock):
    """Not complete while a live node or the store holds the key; then exactly one caller records
    it with one audit record; a removed node does not hold it up."""
    one, two = nodes
    spki = _compromised_then_rekeyed(one)
    assert one.compromises.pending(["www"]) == {"www": {spki}} == two.compromises.pending(["www"])
    one.compromises.destroyed("www", spki, 2)
    assert one.compromises.pending(["www"]) == {} and two.compromises.pending(["www"]) == {"www": {spki}}
    c, recorded = one.compromises.complete("www", spki, LIVE, _event)
    assert not recorded and c.holding == ("node2",) and c.in_store
    one.destroy_key("www", 1)
    two.compromises.destroyed("www", spki, 0)
    assert one.compromises.unfinished(["www"]) == [("www", spki)]
    c, recorded = two.compromises.complete("www", spki, LIVE, _event)
    assert recorded and c.completed_at is not None and c.nodes == ("node1", "node2") and c.holding == ()
    again, recorded = one.compromises.complete("www", spki, LIVE, _event)
    assert not recorded and again.completed_at == c.completed_at
    assert one.compromises.unfinished(["www"]) == []
    assert [r["event"] for r in one.audit.records].count("key_compromise_complete") == 1
    assert one.audit.verify().ok
    (row,) = one.compromises.status(["www"], LIVE)["www"]
    assert row["holding"] == [] and row["nodes"] == ["node1", "node2"] and row["completed_at"]


def test_a_node_that_stopped_heartbeating_still_holds_the_key_until_it_is_removed(nodes, clock):
    """node2 applied the certificate and went quiet (cut off, rebooting): it still serves and
    stores the key, so no completion is recorded over it (it was, once outside the live window:
    review) — until it destroys the key or an operator removes it."""
    one, two = nodes
    spki = _compromised_then_rekeyed(one)
    one.destroy_key("www", 1)
    one.compromises.destroyed("www", spki, 1)
    assert one.compromises.complete("www", spki, LIVE, _event)[0].holding == ("node2",)
    clock.advance(10 * LIVE)  # node2's heartbeat is long past the live window
    one.fleet.heartbeat("node1", "t")
    c, recorded = one.compromises.complete("www", spki, LIVE, _event)
    assert not recorded and c.holding == ("node2",)
    one.fleet.remove("node2")
    c, recorded = one.compromises.complete("www", spki, LIVE, _event)
    assert recorded and c.nodes == ("node1",)


def test_a_version_4_database_is_upgraded_to_6(postgres, clock):
    """A database of the releases' schema 4 gains the verify and destruction tables; its rows stay."""
    with psycopg.connect(postgres) as conn:
        conn.execute("CREATE TABLE certd_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
        conn.execute(DDL)
        for v in (2, 3, 4):
            conn.execute(UPGRADES[v])
        conn.execute("INSERT INTO certd_schema VALUES (1, 4)")
        conn.execute("INSERT INTO certd_desired VALUES ('www', 3)")
    s = _store(postgres, clock, "node1")
    try:
        assert s.desired("www") == 3 and s.compromises.pending(["www"]) == {}
        with psycopg.connect(postgres) as conn:
            assert conn.execute("SELECT version FROM certd_schema").fetchall() == [(VERSION,)] == [(6,)]
            assert conn.execute("SELECT count(*) FROM certd_key_destructions").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM certd_node_verifies").fetchone() == (0,)
    finally:
        s.close()


def test_prune_spares_a_compromised_version_until_its_key_is_gone_everywhere(nodes, clock):
    """The fleet reads which keys to destroy from the compromised versions' rows: prune keeps
    version 1 (compromised, node2 still holds its key) past keep_versions until the completion is
    recorded — pruned, it dropped out and node2 never destroyed its copies (review)."""
    one, two = nodes
    spki = _compromised_then_rekeyed(one)
    lease = one.lease("www", "a", TTL)
    one.add_version("www", make_bundle(), {}, lease=lease)
    one.set_desired("www", 3, lease=lease)
    assert one.prune("www", 1, lease=lease) == [2]
    assert two.compromises.pending(["www"]) == {"www": {spki}}
    one.destroy_key("www", 1, lease=lease)
    one.release(lease)
    for s in (one, two):
        s.compromises.destroyed("www", spki, 1)
    assert one.compromises.complete("www", spki, LIVE, _event)[1]
    lease = one.lease("www", "a", TTL)
    assert one.prune("www", 1, lease=lease) == [1]
    one.release(lease)
