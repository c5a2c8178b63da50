"""What fleet nodes tell each other through PostgreSQL (certd/store/pgfleet.py), on a private
cluster with a fake clock: heartbeats and removal, the per-node reports behind ``status
--fleet``, the shared http-01 answers and their expiry, and the orders left by a dead node."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from certd.core.clock import FakeClock
from certd.core.errors import LockBusy
from certd.crypto.custody import FileKek, KeyRing
from certd.store.port import OrderJournal
from tests.contract.backends import KEK_SECRET
from tests.support.certs import make_bundle


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(postgres: str, clock: FakeClock) -> Iterator[Any]:
    from certd.store.pg import PgStore
    with PgStore(postgres, node="node1", clock=clock, keyring=KeyRing(FileKek(KEK_SECRET, "kek"))) as s:
        yield s


def test_a_removed_node_leaves_the_fleet_status_and_its_heartbeat_says_so(store: Any, clock: FakeClock) -> None:
    """Nodes appear by heartbeat; a removed one no longer counts in status and its heartbeat reports it."""
    assert store.fleet.heartbeat("node1", "1.0") and store.fleet.heartbeat("node2", "1.0")
    clock.advance(5)
    store.fleet.heartbeat("node2", "1.1")
    rows = {n.node: n for n in store.fleet.nodes()}
    assert rows["node2"].software == "1.1" and rows["node2"].last_seen - rows["node2"].first_seen == timedelta(seconds=5)
    assert store.fleet.remove("node2") and not store.fleet.remove("node9")
    assert store.fleet.heartbeat("node2", "1.1") is False
    assert [n["node"] for n in store.fleet.status(["www"])["certificates"][0]["nodes"]] == ["node1"]


def test_status_shows_desired_and_each_nodes_applied_and_served(store: Any, clock: FakeClock) -> None:
    """status --fleet: the desired version, and per node what it applied, serves and last failed with."""
    for node in ("node1", "node2"):
        store.fleet.heartbeat(node, "1.0")
    with store.lock("www"):
        v = store.add_version("www", make_bundle(["www.example.test"]), {})
        store.set_current("www", v)
    store.fleet.report("node1", "www", fingerprint="ab" * 32, verified_at=clock.now(), error=None)
    store.fleet.report("node2", "www", fingerprint=None, verified_at=None, error="reload failed")
    (cert,) = store.fleet.status(["www"])["certificates"]
    assert cert["desired_version"] == v and cert["release"] is None
    n1, n2 = cert["nodes"]
    assert (n1["applied_version"], n1["fingerprint_sha256"], n1["last_error"]) == (v, "ab" * 32, None)
    assert n1["verified_at"] is not None
    assert (n2["applied_version"], n2["last_error"]) == (None, "reload failed")
    assert store.fleet.reported_fingerprint("node1", "www") == "ab" * 32
    assert store.fleet.reported_fingerprint("node2", "www") is None


def test_node_view_reads_desired_applied_and_whether_the_node_reported_serving_it(store: Any) -> None:
    """A reconcile pass's one query: per name the desired version, this node's applied version,
    and whether its last report is the desired version's fingerprint without an error."""
    with store.lock("www"):
        v1 = store.add_version("www", make_bundle(["www.example.test"]), {})
        store.set_current("www", v1)
        v2 = store.add_version("www", make_bundle(["www.example.test"]), {})
        store.set_desired("www", v2)
    fp1, fp2 = (store.load_info("www", v).info.fingerprint_sha256 for v in (v1, v2))
    store.fleet.report("node1", "www", fingerprint=fp1, verified_at=None, error=None)
    views = store.fleet.node_view("node1", ["www", "new"])
    assert (views["www"].desired, views["www"].applied, views["www"].reported) == (v2, v1, False)
    assert (views["new"].desired, views["new"].applied, views["new"].reported) == (None, None, False)
    store.set_applied("node1", "www", v2)
    store.fleet.report("node1", "www", fingerprint=fp2, verified_at=None, error=None)
    assert store.fleet.node_view("node1", ["www"])["www"].reported
    assert not store.fleet.node_view("node2", ["www"])["www"].reported  # node2 reported nothing
    store.fleet.report("node1", "www", fingerprint=None, verified_at=None, error="reload failed")
    assert not store.fleet.node_view("node1", ["www"])["www"].reported


def test_a_published_answer_is_served_until_withdrawn_or_expired(store: Any, clock: FakeClock) -> None:
    """Any node finds a published http-01 answer; it is gone once withdrawn, or after its expiry."""
    store.fleet.publish("tok1", "tok1.thumb", "www.example.test")
    store.fleet.publish("tok2", "tok2.thumb", "www.example.test")
    assert store.fleet.lookup("tok1") == "tok1.thumb" and store.fleet.lookup("nope") is None
    store.fleet.withdraw("tok1")
    assert store.fleet.lookup("tok1") is None and store.fleet.lookup("tok2") == "tok2.thumb"
    clock.advance(3601)
    assert store.fleet.lookup("tok2") is None


def test_an_order_is_orphaned_only_once_its_lease_is_free(store: Any, clock: FakeClock) -> None:
    """A journaled order is another node's to finish only after its holder's lease expired or was released."""
    lease = store.lease("www", "node2:1", 60.0)
    key = make_bundle(["www.example.test"]).key_pem
    store.save_order("www", OrderJournal("https://ca.test/order/1", key, "2027-01-01T00:00:00Z"), lease=lease)
    assert store.fleet.orphaned_orders(["www"]) == []
    clock.advance(61)
    assert store.fleet.orphaned_orders(["www", "other"]) == ["www"]


def test_a_restarted_node_frees_the_leases_its_dead_process_held(store: Any) -> None:
    """Leases held by a process of this node, in this boot and PID namespace of this host, that is gone (or whose pid now names a process started later) are released at once; a live process's, another PID namespace's or host's, and another node's are kept."""
    import os
    import subprocess

    from certd.store import pglease
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    mine, parent = pglease.owner_prefix("node1"), os.getppid()
    started = pglease._proc_start(parent)
    owners = {"dead": f"{mine}{gone.pid}.12345:1", "reused": f"{mine}{parent}.1:1",
              "live": f"{mine}{parent}.{started}:1", "myself": pglease.owner("node1"),
              "other-pidns": f"node1@{mine.split('@')[1].split('/')[0]}/boot/4026531836:{gone.pid}.12345:1",
              "host": f"node1@another-host/boot/1:{gone.pid}.12345:1",
              "node": f"{pglease.owner_prefix('node2')}{gone.pid}.12345:1"}
    for name, owner in owners.items():
        store.lease(name, owner, 600.0)
    assert sorted(store.reclaim_dead_leases()) == ["dead", "reused"]
    assert store.lease("dead", "node1-again", 600.0).token == 2  # free at once, fenced by a new token
    for name in ("live", "myself", "other-pidns", "host", "node"):
        with pytest.raises(LockBusy):
            store.lease(name, "someone", 600.0)
