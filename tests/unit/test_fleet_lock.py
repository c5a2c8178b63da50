"""The fleet's lock (certd/store/pglease.py) over the store contract's leases, on a fake clock:
a proof extends the lease, a lease taken over cannot be proven, a holder's writes are fenced,
and the local mutex alone (the apply loop's) never waits for the fleet lease."""

from __future__ import annotations

import threading

import pytest

from certd.core.clock import FakeClock
from certd.core.errors import LockBusy
from certd.store.memory import MemoryStore
from certd.store.pglease import CONNECTION_BOUND, FleetLock, fleet_ttl
from certd.store.port import Lease, LeaseLost


def make(clock: FakeClock, ttl: float = 60.0) -> tuple[MemoryStore, FleetLock, dict[str, Lease]]:
    store = MemoryStore(clock=clock)
    bound: dict[str, Lease] = {}
    return store, FleetLock(store, bound, "node1", ttl, clock), bound


def test_the_ttl_outlasts_an_order_plus_a_dead_connection() -> None:
    """A lease outlives the order timeout plus the time a cut-off node needs to lose its connections."""
    assert fleet_ttl(90.0) > 90.0 + CONNECTION_BOUND


def test_a_proof_extends_the_lease_from_now() -> None:
    """check() right before newOrder/finalize extends the lease: nobody can take it for another TTL."""
    clock = FakeClock()
    store, lock, bound = make(clock)
    with lock.held("www", timeout=0):
        clock.advance(50)
        lock.check("www")
        clock.advance(50)  # 100 s after the grant, 50 s after the proof
        with pytest.raises(LockBusy):
            store.lease("www", "node2", 60.0)
        assert bound["www"].token == 1


def test_a_lease_taken_over_cannot_be_proven() -> None:
    """A holder stalled past its TTL and taken over fails its next proof: it must not finalize."""
    clock = FakeClock()
    store, lock, bound = make(clock)
    lease = store.lease("www", "node1:x", 60.0)
    bound["www"] = lease
    clock.advance(61)
    store.lease("www", "node2", 60.0)
    with pytest.raises(LeaseLost):
        lock.check("www")


def test_the_apply_mutex_does_not_wait_for_the_fleet_lease() -> None:
    """While another node holds the lease, this node's apply loop still takes its local mutex at once."""
    clock = FakeClock()
    store, lock, _ = make(clock)
    other = store.lease("www", "node2", 60.0)
    with lock.local("www", timeout=0):
        pass
    with pytest.raises(LockBusy):
        with lock.held("www", timeout=0):
            pass
    store.release(other)


def test_a_rotation_in_this_process_excludes_the_apply_loop() -> None:
    """A rotation holding the lock makes the apply loop's mutex busy (it applies nothing meanwhile)."""
    clock = FakeClock()
    _, lock, _ = make(clock)
    busy: list[bool] = []
    with lock.held("www", timeout=0):
        def apply() -> None:
            try:
                with lock.local("www", timeout=0):
                    busy.append(False)
            except LockBusy:
                busy.append(True)
        t = threading.Thread(target=apply)
        t.start()
        t.join()
    assert busy == [True]
