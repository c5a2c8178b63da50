"""PgStore beyond the shared contract suite (tests/contract runs that on it): keys only sealed,
the schema under concurrent starts, grants racing, the FOR SHARE ordering, the database's own
clock, the LISTEN wake-up and the hash-chained audit rows. On a private cluster
(tests/support/postgres.py)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from certd.core.clock import FakeClock
from certd.core.errors import LockBusy, StoreError
from certd.core.events import LifecycleEvent
from certd.crypto.custody import CustodyError, FileKek, KeyRing, is_sealed
from certd.store.port import DesiredChange, LeaseLost, OrderJournal
from tests.support.certs import make_bundle

psycopg = pytest.importorskip("psycopg")
from certd.store.pg import PgStore  # noqa: E402
from certd.store.pgschema import VERSION  # noqa: E402

TTL = 30.0


def _ring() -> KeyRing:
    return KeyRing(FileKek(bytes(range(32)), "kek"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc))


@pytest.fixture
def opened(postgres):
    stores: list[PgStore] = []

    def open_store(node: str = "node1", **kw) -> PgStore:
        kw.setdefault("keyring", _ring())
        stores.append(PgStore(postgres, node=node, **kw))
        return stores[-1]
    yield open_store
    for s in stores:
        s.close()


def _raw(dsn: str, sql: str, args=()):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()


def test_without_keys_a_private_key_is_refused(opened, clock):
    """A shared database never holds a plain key: without [keys], storing one is an error."""
    s = opened(keyring=None, clock=clock)
    lease = s.lease("www", "a", TTL)
    for store_key in (lambda: s.add_version("www", make_bundle(), {}, lease=lease),
                      lambda: s.save_order("www", OrderJournal("https://ca/o/1", b"k", "t"), lease=lease),
                      lambda: s.save_account("https://ca/dir", b"k", "{}")):
        with pytest.raises(StoreError, match=r"shared database needs \[keys\]"):
            store_key()
    assert s.versions("www") == [] and s.load_order("www") is None
    s.write_state("www", {"n": 1}, expected=None, lease=lease)  # everything else works


def test_keys_are_sealed_at_rest_and_bound_to_their_slot(opened, postgres):
    """Every key in the tables is a sealed envelope (no PEM); moved to another row it does not open."""
    s = opened()
    lease = s.lease("www", "a", TTL)
    bundle = make_bundle()
    s.add_version("www", bundle, {}, lease=lease)
    s.add_version("www", make_bundle(), {}, lease=lease)
    s.save_order("www", OrderJournal("https://ca/o/1", bundle.key_pem, "t"), lease=lease)
    s.save_account("https://ca/dir", bundle.key_pem, "{}")
    for table in ("certd_versions", "certd_orders", "certd_accounts"):
        for (key,) in _raw(postgres, f"SELECT key FROM {table}"):
            assert is_sealed(bytes(key)) and b"PRIVATE KEY" not in bytes(key)
    assert s.load("www", 1).bundle.key_pem == bundle.key_pem
    assert s.load_account("https://ca/dir") == (bundle.key_pem, "{}")
    with psycopg.connect(postgres) as conn:
        conn.execute("UPDATE certd_versions SET key = (SELECT key FROM certd_versions WHERE version = 1) "
                     "WHERE version = 2")
    with pytest.raises(CustodyError, match="sealed for"):
        s.load("www", 2)


def test_nodes_starting_together_create_the_schema_once(opened, postgres):
    """Eight stores opened at once on an empty database: one schema, every store works."""
    stores: list[PgStore] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            stores.append(opened(f"node{i}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(stores) == 8
    assert _raw(postgres, "SELECT id, version FROM certd_schema") == [(1, VERSION)]


def test_a_newer_schema_is_refused(opened, postgres):
    opened()
    with psycopg.connect(postgres) as conn:
        conn.execute("UPDATE certd_schema SET version = %s", (VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this certd"):
        opened("node2")


def test_a_version_1_database_is_upgraded_in_place_keeping_its_rows(opened, postgres, clock):
    """A database made by the first fleet release gains the fleet tables when a newer node starts;
    the certificates already in it are untouched."""
    from certd.store.pgschema import DDL
    with psycopg.connect(postgres) as conn:  # what a version-1 node made
        conn.execute("CREATE TABLE certd_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
        conn.execute(DDL)
        conn.execute("INSERT INTO certd_schema VALUES (1, 1)")
        conn.execute("INSERT INTO certd_desired VALUES ('www', 3)")
    s = opened(clock=clock)
    assert s.desired("www") == 3
    assert _raw(postgres, "SELECT version FROM certd_schema") == [(VERSION,)]
    assert _raw(postgres, "SELECT to_regclass('certd_nodes') IS NOT NULL") == [(True,)]


def test_racing_grants_have_one_winner(opened, clock):
    """Clients asking for a free lease at the same moment: exactly one is granted."""
    clients = [opened(f"node{i}", clock=clock) for i in range(6)]
    won: list[int] = []
    busy: list[str] = []
    gate = threading.Barrier(len(clients))

    def ask(s: PgStore) -> None:
        gate.wait()
        try:
            won.append(s.lease("www", s.node, TTL).token)
        except LockBusy:
            busy.append(s.node)
    threads = [threading.Thread(target=ask, args=(s,)) for s in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert won == [1] and len(busy) == 5


def test_a_takeover_waits_for_a_fenced_write_in_flight(opened, clock, postgres):
    """A fenced write holds the lease row FOR SHARE until it commits: a grant of that expired
    lease waits for it, so the write is ordered before the takeover (not after it)."""
    a, b = opened("node1", clock=clock), opened("node2", clock=clock)
    a.lease("www", "a", TTL)
    clock.advance(TTL + 1)
    with psycopg.connect(postgres) as writer:
        writer.execute("SELECT token FROM certd_leases WHERE name = 'www' FOR SHARE")
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(b.lease("www", "b", TTL).token))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got  # blocked behind the write's transaction
        writer.commit()
    t.join(30)
    assert got == [2]


def test_expiry_by_the_database_clock(opened):
    """Without an injected clock the database's clock judges expiry."""
    a, b = opened("node1"), opened("node2")
    held = a.lease("www", "a", 0.3)
    with pytest.raises(LockBusy):
        b.lease("www", "b", TTL)
    assert b.lease("www", "b", TTL, wait=10.0).token == held.token + 1


def test_the_feed_wakes_on_a_notification(opened):
    """With the real clock a subscriber waiting for changes is woken by the commit's NOTIFY,
    well before its timeout (a SELECT still gives the answer)."""
    a, b = opened("node1"), opened("node2")
    lease = a.lease("www", "a", TTL)
    a.add_version("www", make_bundle(), {}, lease=lease)
    sub = b.subscribe()
    try:
        timer = threading.Timer(0.3, lambda: a.set_desired("www", 1, lease=lease))
        timer.start()
        t0 = time.monotonic()
        assert sub.changes(timeout=20.0) == [DesiredChange("www", 1)]
        assert time.monotonic() - t0 < 5.0
        timer.join()
    finally:
        sub.close()


class ReadCounter:
    """The store as a subscription sees it (pgfeed's _Db), counting its reads of the database."""

    def __init__(self, store: PgStore) -> None:
        self.store, self.dsn, self.reads = store, store.dsn, 0

    @property
    def clock(self):
        return self.store.clock

    def now_param(self):
        return self.store.now_param()

    def tx(self):
        self.reads += 1
        return self.store.tx()


def test_an_idle_feed_does_not_read_the_desired_versions(opened):
    """An idle subscriber reads nothing while nothing is notified; a notified change reads that name and is seen."""
    from certd.store.pgfeed import PgSubscription
    a, b = opened("node1"), opened("node2")
    lease = a.lease("www", "a", TTL)
    for n in ("www", "api"):
        a.add_version(n, make_bundle(), {}, lease=a.lease(n, "a", TTL) if n == "api" else lease)
    counter = ReadCounter(b)
    sub = PgSubscription(counter, None)
    try:
        assert counter.reads == 1  # the first read, after LISTEN began
        for _ in range(20):
            assert sub.changes() == []
        assert sub.changes(timeout=1.5) == []
        assert counter.reads == 1
        a.set_desired("www", 1, lease=lease)
        assert sub.changes(timeout=20.0) == [DesiredChange("www", 1)]
        assert counter.reads == 2
    finally:
        sub.close()


def test_a_fleet_feed_also_wakes_on_a_release_report(opened):
    """A node's report on a release moves no desired version: a plain subscriber sleeps on, the
    fleet pass's (``notified=True``) wakes with the name and its unchanged version."""
    a, b = opened("node1"), opened("node2")
    lease = a.lease("www", "a", TTL)
    a.add_version("www", make_bundle(), {}, lease=lease)
    a.set_desired("www", 1, lease=lease)
    plain, fleet = b.subscribe(), b.subscribe(notified=True)
    try:
        a.releases.report("www", 1, "node1", True, None)
        assert fleet.changes(timeout=20.0) == [DesiredChange("www", 1)]
        assert plain.changes(timeout=1.0) == []
    finally:
        plain.close()
        fleet.close()


def test_audit_rows_are_a_verifiable_hash_chain(opened, clock, postgres):
    """Records from two nodes form one chain (seq 1..n, each prev the hash of the line
    before); editing a row is found by verify()."""
    a, b = opened("node1", clock=clock), opened("node2", clock=clock)
    for i, s in enumerate((a, b, a, b)):
        s.audit(LifecycleEvent("issued", "www", clock.now(), version=i + 1))
    assert [r["seq"] for r in a.audit.records] == [1, 2, 3, 4]
    assert a.audit.verify().ok
    with pytest.raises(ValueError, match="private key"):
        a.audit(LifecycleEvent("issued", "www", clock.now(), reason="-----BEGIN PRIVATE KEY-----"))
    with psycopg.connect(postgres) as conn:
        conn.execute("UPDATE certd_audit SET line = replace(line, '\"version\": 2', '\"version\": 9') WHERE seq = 2")
    problems = b.audit.verify().problems
    assert problems and "line 2" in problems[0]


def test_a_killed_connection_costs_one_operation(opened, postgres):
    """A pooled connection the server dropped fails the operation on it with a (transient)
    StoreError and is discarded; the next operation gets a fresh connection."""
    s = opened()
    s.write_state("www", {"n": 1}, expected=None)
    _raw(postgres, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'certd node1'")
    failures = 0
    for _ in range(6):
        try:
            assert s.read_state("www")[0] == {"n": 1}
            break
        except StoreError as e:
            assert e.transient
            failures += 1
    else:
        pytest.fail("the store did not recover from a killed connection")
    assert failures <= 4  # at most one per pooled connection


def test_a_version_2_database_keeps_replayed_records_from_being_chained_again(opened, postgres, clock):
    """After the upgrade to version 3, a spool id a version-2 node's replay chained (in the line only) is not chained again."""
    from certd.ops.audit import record_fields, record_line
    from certd.ops.auditchain import line_hash, record_hash
    from certd.store.pgschema import DDL, UPGRADES
    ev = LifecycleEvent("renew_refused", "www", clock.now(), initiator="ops", reason="#1", detail={"node": "web1"})
    fields = record_fields(ev)
    fields["detail"] = {**fields["detail"], "spool_id": "web1:replayed-by-v2"}
    record = {"seq": 1, **fields, "prev": "0" * 64}
    record["hash"] = record_hash(record)
    line = record_line(record)
    with psycopg.connect(postgres) as conn:  # what a version-2 node made, and its replay chained
        conn.execute("CREATE TABLE certd_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
        conn.execute(DDL)
        conn.execute(UPGRADES[2])
        conn.execute("INSERT INTO certd_schema VALUES (1, 2)")
        conn.execute("INSERT INTO certd_audit VALUES (1, %s)", (line.decode(),))
        conn.execute("UPDATE certd_audit_head SET seq = 1, prev = %s", (line_hash(line),))
    s = opened(clock=clock)
    assert _raw(postgres, "SELECT seq, spool_id FROM certd_audit") == [(1, "web1:replayed-by-v2")]
    assert s.audit.append_spooled([("web1:replayed-by-v2", fields)]) == 0
    assert s.audit.append_spooled([("web1:new", {**fields, "detail": {"node": "web1", "spool_id": "web1:new"}})]) == 1
    assert [r["detail"]["spool_id"] for r in s.audit.records] == ["web1:replayed-by-v2", "web1:new"]
    assert s.audit.verify().ok


def test_the_order_intent_is_written_with_the_lease_proof_and_never_past_a_takeover(opened, clock, postgres):
    """prove_with_order extends the held lease and journals the intent in one statement; once
    another node took the lease over, it writes nothing and raises LeaseLost."""
    a, b = opened("node1", clock=clock, lease_ttl=TTL), opened("node2", clock=clock, lease_ttl=TTL)
    intent = OrderJournal("", b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n", "t",
                          {"directory": "https://ca/dir"})
    with a.lock("www"):
        clock.advance(TTL / 2)
        a.prove_with_order("www", intent)
        got = b.load_order("www")
        assert got is not None and got.intent and got.key_pem == intent.key_pem
        (expires,) = _raw(postgres, "SELECT expires FROM certd_leases WHERE name = 'www'")[0]
        assert expires == clock.now() + timedelta(seconds=TTL)   # extended from now, as check_lock does
        assert b"PRIVATE KEY" not in bytes(_raw(postgres, "SELECT key FROM certd_orders")[0][0])
        clock.advance(TTL + 1)
        taken = b.lease("www", "b", TTL)
        b.save_order("www", None, lease=taken)
        with pytest.raises(LeaseLost):
            a.prove_with_order("www", intent)
        assert b.load_order("www") is None
