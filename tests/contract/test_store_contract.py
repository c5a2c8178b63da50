"""The store seam's contracts (certd/store/port.py), run against every store in backends.BACKENDS."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from certd.core.clock import FakeClock
from certd.core.errors import LockBusy, StoreError
from certd.core.events import LifecycleEvent
from certd.store.files import LEGACY_TTL
from certd.store.port import Conflict, DesiredChange, Fenced, LeaseLost, OrderJournal, StorePort, update_state
from tests.contract.backends import BACKENDS
from tests.support.certs import make_bundle

TTL = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc))


@pytest.fixture(params=sorted(BACKENDS))
def opener(request, tmp_path, clock):
    backend = BACKENDS[request.param]
    needs = {f: request.getfixturevalue(f) for f in getattr(backend, "fixtures", ())}
    with backend(tmp_path, clock, **needs) as open_node:
        yield open_node


@pytest.fixture
def store(opener):
    return opener("node1")


def _add(store, lease, n=1, name="www"):
    return [store.add_version(name, make_bundle(), {"reason": f"v{i}"}, lease=lease) for i in range(n)]


# --- versions -------------------------------------------------------------------------------

def test_versions_are_numbered_and_load_back(store):
    """add_version numbers versions 1, 2, ...; load returns the bundle and meta as stored."""
    lease = store.lease("www", "a", TTL)
    bundle = make_bundle()
    assert store.add_version("www", bundle, {"reason": "first"}, lease=lease) == 1
    assert _add(store, lease) == [2]
    assert store.versions("www") == [1, 2]
    sv = store.load("www", 1)
    assert (sv.bundle.cert_pem, sv.bundle.key_pem, sv.meta["reason"]) == (bundle.cert_pem, bundle.key_pem, "first")
    assert store.load_info("www", 1).info.serial == bundle.info.serial
    assert "www" in store.names()
    with pytest.raises(StoreError):
        store.load("www", 9)


def test_the_issuing_ca_and_the_cas_skipped_come_back_from_meta(store):
    """A version's meta keeps the issuing CA's name and the CAs skipped with their reasons (status and audit read them)."""
    lease = store.lease("www", "a", TTL)
    skipped = [{"ca": "primary", "reason": "refused the order (caa)"}]
    store.add_version("www", make_bundle(), {"ca": "backup", "ca_skipped": skipped}, lease=lease)
    for meta in (store.load("www", 1).meta, store.load_info("www", 1).meta):
        assert meta["ca"] == "backup" and meta["ca_skipped"] == skipped


def test_update_meta_destroy_key_and_prune(store):
    """update_meta merges; destroy_key empties the key and marks it; prune spares desired and protected."""
    lease = store.lease("www", "a", TTL)
    _add(store, lease, 4)
    store.update_meta("www", 1, {"revoked": {"reason": "superseded"}}, lease=lease)
    assert store.load("www", 1).meta["revoked"] == {"reason": "superseded"}
    store.destroy_key("www", 1, lease=lease)
    assert store.load("www", 1).bundle.key_pem == b"" and store.load("www", 1).meta["key_destroyed"]
    with pytest.raises(StoreError, match="destroyed"):
        store.set_desired("www", 1, lease=lease)
    store.set_desired("www", 2, lease=lease)
    assert store.prune("www", 1, protect={3}, lease=lease) == [1, 4]
    assert store.versions("www") == [2, 3]


def test_meta_must_not_hold_key_material(store):
    """A version whose meta holds a private key is refused."""
    lease = store.lease("www", "a", TTL)
    with pytest.raises(ValueError):
        store.add_version("www", make_bundle(), {"oops": "-----BEGIN PRIVATE KEY-----"}, lease=lease)


# --- leases and fencing -----------------------------------------------------------------------

def test_tokens_strictly_increase_across_grants_and_clients(opener):
    """Every grant of a certificate's lease has a larger token, whichever client asks."""
    a, b = opener("node1"), opener("node2")
    tokens = []
    for s in (a, b, a, b):
        lease = s.lease("www", s.node, TTL)
        tokens.append(lease.token)
        s.release(lease)
    assert tokens == sorted(set(tokens)) and len(tokens) == 4
    assert a.lease("api", "x", TTL).token >= 1  # per certificate, independent


def test_a_held_lease_is_busy_for_everyone(opener):
    """While held and unexpired, lease() raises LockBusy for another client and the same owner."""
    a, b = opener("node1"), opener("node2")
    lease = a.lease("www", "a", TTL)
    with pytest.raises(LockBusy):
        b.lease("www", "b", TTL)
    with pytest.raises(LockBusy):
        a.lease("www", "a", TTL)
    a.check(lease)
    a.release(lease)
    a.release(lease)  # idempotent
    assert b.lease("www", "b", TTL).token == lease.token + 1


def test_renew_extends_the_lease(store, clock):
    """A renewed lease outlives its first TTL: still checked, still busy for others."""
    lease = store.lease("www", "a", TTL)
    clock.advance(TTL - 1)
    lease = store.renew(lease, TTL)
    clock.advance(TTL - 1)
    store.check(lease)
    with pytest.raises(LockBusy):
        store.lease("www", "b", TTL)


def test_expired_lease_is_taken_over_and_the_stalled_holder_is_fenced(opener, clock):
    """A holder that stalls past its TTL loses the lease: check/renew say LeaseLost and every
    write it then makes is refused with Fenced, leaving the store as the new holder left it."""
    a, b = opener("node1"), opener("node2")
    stale = a.lease("www", "a", TTL)
    _add(a, stale)
    a.set_desired("www", 1, lease=stale)
    clock.advance(TTL + 1)  # a stalls (GC pause, SIGSTOP, partition)
    fresh = b.lease("www", "b", TTL, wait=0)
    assert fresh.token > stale.token
    _, etag = b.read_state("www")
    with pytest.raises(LeaseLost):
        a.check(stale)
    with pytest.raises(LeaseLost):
        a.renew(stale, TTL)
    writes = [
        lambda: a.add_version("www", make_bundle(), {}, lease=stale),
        lambda: a.set_desired("www", 1, lease=stale),
        lambda: a.update_meta("www", 1, {"x": 1}, lease=stale),
        lambda: a.save_rotation("node1", "www", {"step": "staged"}, lease=stale),
        lambda: a.save_order("www", OrderJournal("https://ca/order/1", b"key", "t"), lease=stale),
        lambda: a.write_state("www", {"failures": 9}, expected=etag, lease=stale),
        lambda: a.prune("www", 0, lease=stale),
        lambda: a.destroy_key("www", 1, lease=stale),
    ]
    for write in writes:
        with pytest.raises(Fenced):
            write()
    assert b.versions("www") == [1] and b.desired("www") == 1 and "x" not in b.load("www", 1).meta
    assert b.load_rotation("node1", "www") is None and b.load_order("www") is None
    assert b.read_state("www") == (None, None) and b.load("www", 1).bundle.key_pem
    a.release(stale)  # a lost lease is released quietly and frees nothing
    with pytest.raises(LockBusy):
        a.lease("www", "a", TTL)
    b.check(fresh)


def test_expired_but_not_taken_over_still_writes(store, clock):
    """Expiry alone fences nothing (the token is still the newest), but check() says LeaseLost."""
    lease = store.lease("www", "a", TTL)
    clock.advance(TTL + 1)
    assert _add(store, lease) == [1]
    with pytest.raises(LeaseLost):
        store.check(lease)


def test_lease_waits_for_expiry(opener, clock):
    """lease(wait=) keeps trying until the holder's lease expires by the clock."""
    a, b = opener("node1"), opener("node2")
    held = a.lease("www", "a", 5.0)
    got = b.lease("www", "b", TTL, wait=10.0)  # the fake clock advances while it polls
    assert got.token == held.token + 1


def test_single_host_lock_fences_the_adapter_writes(opener, clock):
    """lock() binds its lease: writes inside go through; once another client took the lease
    over (the holder stalled past its TTL), the holder's adapter writes are Fenced."""
    a, b = opener("node1"), opener("node2")
    with a.lock("www"):
        a.add_version("www", make_bundle(), {})
        a.save_journal("www", {"step": "issued"})
        clock.advance(LEGACY_TTL + 1)
        taker = b.lease("www", "b", TTL)
        with pytest.raises(Fenced):
            a.save_journal("www", {"step": "staged"})
        with pytest.raises(Fenced):
            a.set_current("www", 1)
    assert a.load_journal("www") == {"step": "issued"}
    b.release(taker)
    with a.lock("www", timeout=0):
        a.set_current("www", 1)
    assert (a.desired("www"), a.applied("node1", "www"), a.current("www")) == (1, 1, 1)


# --- compare-and-set state ----------------------------------------------------------------------

def test_state_is_compare_and_set(opener):
    """write_state succeeds only against the etag read; a stale or absent one is a Conflict."""
    a, b = opener("node1"), opener("node2")
    assert a.read_state("www") == (None, None)
    e1 = a.write_state("www", {"failures": 1}, expected=None)
    with pytest.raises(Conflict):
        b.write_state("www", {"failures": 5}, expected=None)
    state, seen = b.read_state("www")
    assert (state, seen) == ({"failures": 1}, e1)
    e2 = b.write_state("www", {"failures": 2}, expected=e1)
    assert e2 != e1
    with pytest.raises(Conflict):
        a.write_state("www", {"failures": 3}, expected=e1)
    assert a.read_state("www") == ({"failures": 2}, e2)
    assert a.load_state("www") == {"failures": 2}


def test_concurrent_cas_loses_no_update(opener):
    """Eight clients incrementing one counter by CAS (retrying on Conflict) lose no increment."""
    clients = [opener(f"node{i}") for i in range(8)]
    clients[0].write_state("www", {"n": 0}, expected=None)

    def bump(s) -> None:
        for _ in range(15):
            while True:
                state, etag = s.read_state("www")
                try:
                    s.write_state("www", {"n": state["n"] + 1}, expected=etag)
                    break
                except Conflict:
                    continue
    threads = [threading.Thread(target=bump, args=(s,)) for s in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert clients[0].read_state("www")[0] == {"n": 120}


def test_update_state_merges_concurrent_changes(opener):
    """update_state re-reads on Conflict, so two clients changing different keys both land."""
    clients = [opener(f"node{i}") for i in range(4)]

    def note(s, key: str) -> None:
        for i in range(10):
            update_state(s, "www", lambda st, i=i: st.update({key: i, "n": st.get("n", 0) + 1}), attempts=1000)
    threads = [threading.Thread(target=note, args=(s, f"k{j}")) for j, s in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    state = clients[0].read_state("www")[0]
    assert state == {"k0": 9, "k1": 9, "k2": 9, "k3": 9, "n": 40}


# --- desired and applied, journals -----------------------------------------------------------

def test_desired_is_fleet_wide_and_applied_per_node(opener):
    """set_desired is seen by every client; applied is kept per node and set independently."""
    a, b = opener("node1"), opener("node2")
    lease = a.lease("www", "a", TTL)
    _add(a, lease, 2)
    a.set_desired("www", 2, lease=lease)
    assert b.desired("www") == 2
    assert (a.applied("node1", "www"), a.applied("node2", "www")) == (None, None)
    a.set_applied("node1", "www", 2)
    b.set_applied("node2", "www", 1)
    assert (b.applied("node1", "www"), a.applied("node2", "www")) == (2, 1)
    a.set_applied("node1", "www", None)
    assert b.applied("node1", "www") is None


def test_rotation_journal_is_keyed_by_node(opener):
    """Each node's rotation journal is its own; None removes only that one."""
    a, b = opener("node1"), opener("node2")
    lease = a.lease("www", "a", TTL)
    a.save_rotation("node1", "www", {"step": "staged", "to_version": 2}, lease=lease)
    a.save_rotation("node2", "www", {"step": "verified", "to_version": 2}, lease=lease)
    assert b.load_rotation("node1", "www") == {"step": "staged", "to_version": 2}
    assert a.load_journal("www") == {"step": "staged", "to_version": 2}  # this node's, single-host
    assert b.load_journal("www") == {"step": "verified", "to_version": 2}
    a.save_rotation("node1", "www", None, lease=lease)
    assert a.load_rotation("node1", "www") is None and b.load_journal("www") is not None


def test_another_nodes_rotation_is_listed_and_dropped_with_what_it_applied(opener):
    """foreign_rotations lists the other nodes' journals of one certificate; drop_rotation removes
    one node's journal and applied report, fenced by the holder's lease."""
    a, b = opener("node1"), opener("node2")
    lease = a.lease("www", "a", TTL)
    a.save_rotation("node1", "www", {"step": "staged", "to_version": 2}, lease=lease)
    a.save_rotation("node2", "www", {"step": "verified", "to_version": 2}, lease=lease)
    a.save_rotation("node3", "other", {"step": "issued", "to_version": 1}, lease=a.lease("other", "a", TTL))
    a.set_applied("node1", "www", 1)
    assert b.foreign_rotations("www") == {"node1": {"step": "staged", "to_version": 2}}
    assert a.foreign_rotations("www") == {"node2": {"step": "verified", "to_version": 2}}
    a.release(lease)
    with b.lock("www"):  # drop_rotation is fenced by the lease lock() binds
        with pytest.raises(Fenced):
            a.save_rotation("node1", "www", None, lease=lease)
        b.drop_rotation("node1", "www")
    assert b.foreign_rotations("www") == {} and a.applied("node1", "www") is None
    assert a.load_rotation("node2", "www") is not None and a.foreign_rotations("other") == {"node3": {
        "step": "issued", "to_version": 1}}


def test_order_journal_lets_another_client_resume(opener):
    """An order journal saved by one client (URL, key, meta) is read whole by another, then removed."""
    a, b = opener("node1"), opener("node2")
    lease = a.lease("www", "a", TTL)
    key = make_bundle().key_pem
    a.save_order("www", OrderJournal("https://ca.test/order/7", key, "2026-12-03T08:00:00Z",
                                     {"domains": ["www.example.test"]}), lease=lease)
    a.release(lease)
    resume = b.lease("www", "b", TTL)
    order = b.load_order("www")
    assert order is not None and (order.order_url, order.key_pem) == ("https://ca.test/order/7", key)
    assert order.meta == {"domains": ["www.example.test"]}
    b.save_order("www", None, lease=resume)
    assert a.load_order("www") is None


def test_an_order_intent_is_journaled_with_the_lease_proof_and_not_past_a_takeover(opener, clock):
    """prove_with_order under lock(): the intent (no URL) is there for another client; once another
    client took the lease over, it raises LeaseLost and writes nothing."""
    a, b = opener("node1"), opener("node2")
    key = make_bundle().key_pem
    intent = OrderJournal("", key, "2026-12-03T08:00:00Z", {"domains": ["www.example.test"]})
    with a.lock("www"):
        a.prove_with_order("www", intent)
        got = b.load_order("www")
        assert got is not None and got.intent and got.key_pem == key and got.meta == intent.meta
        clock.advance(LEGACY_TTL + 1)
        taker = b.lease("www", "b", TTL)
        b.save_order("www", None, lease=taker)
        with pytest.raises(LeaseLost):
            a.prove_with_order("www", intent)
    assert b.load_order("www") is None


# --- change feed -----------------------------------------------------------------------------

def test_change_feed_reports_the_latest_desired_version(opener, clock):
    """A subscriber sees each certificate whose desired version changed, with its latest
    version, once; a filtered subscriber only its names; nothing new: [] after the timeout."""
    a, b = opener("node1"), opener("node2")
    sub, only_api = b.subscribe(), b.subscribe(["api"])
    assert sub.changes() == []
    for name in ("www", "api"):
        lease = a.lease(name, "a", TTL)
        _add(a, lease, 2, name=name)
        a.set_desired(name, 1, lease=lease)
        if name == "www":
            a.set_desired(name, 2, lease=lease)
        a.release(lease)
    assert sub.changes() == [DesiredChange("api", 1), DesiredChange("www", 2)]
    assert sub.changes(timeout=5.0) == []  # the fake clock advances while it waits
    assert only_api.changes() == [DesiredChange("api", 1)]
    sub.close()
    assert sub.changes() == []


# --- accounts and audit -----------------------------------------------------------------------

def test_accounts_round_trip_and_registration_lock(opener):
    """A saved account is read by another client; account_lock excludes other clients."""
    a, b = opener("node1"), opener("node2")
    url = "https://ca.test/dir"
    assert a.load_account(url) is None
    a.save_account(url, b"-----BEGIN PRIVATE KEY-----\n", '{"uri": "x"}')
    assert b.load_account(url) == (b"-----BEGIN PRIVATE KEY-----\n", '{"uri": "x"}')
    with a.account_lock(url):
        with pytest.raises(LockBusy):
            with b.account_lock(url, timeout=0):
                pass
    with b.account_lock(url, timeout=0):
        pass


def test_audit_sink_accepts_lifecycle_events(store, clock):
    """The audit sink reachable through the store takes a lifecycle event."""
    store.audit(LifecycleEvent("issued", "www", clock.now(), version=1))


def test_the_store_has_every_member_of_the_port(store):
    """Every backend offers the whole StorePort (a member missing fails here, not in the engine)."""
    assert isinstance(store, StorePort)
