"""A fleet under faults (issue 16, part 1): a node cut off from the database while it holds the
lease, and the database itself stopped under three running nodes. One node serves through
HAProxy, the others through nginx. The fleet is tests.support.fleet's (as in test_fleet.py).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet import Fleet, start_fleet
from tests.support.hostile_ca import FINALIZE_PATH
from tests.support.partition_proxy import PartitionProxy
from tests.support.postgres import PgCluster
from tests.support.procs import wait_until

SERVERS = ("nginx", "haproxy", "nginx")  # node2 is the HAProxy node
CHALLENGE_PATH = "/chalZ/"  # Pebble's challenge URLs: node 3 answers its challenge there



def new_orders_seen(fleet: Fleet, began: float) -> str:
    """The newOrder requests (seconds from the cut, payload), the orders created and finalized:
    what a failure needs to tell a node's retry from a repeated request."""
    seen = [(round(t - began, 1), payload.decode(errors="replace")[:200]) for t, payload in fleet.ca.new_orders]
    return f"newOrder requests {seen}; created {len(fleet.ca.orders_created)}, finalized {len(fleet.ca.finalized)}"


def one_version(fleet: Fleet, version: int) -> None:
    """``certd status --fleet --json`` shows every node on ``version``, verified, no error."""
    cert = fleet.status_cli()
    assert cert["desired_version"] == version, cert
    assert sorted(n["node"] for n in cert["nodes"]) == ["node1", "node2", "node3"], cert
    assert {n["applied_version"] for n in cert["nodes"]} == {version}, cert
    assert all(n["verified_at"] and n["last_error"] is None for n in cert["nodes"]), cert


@pytest.fixture
def cut_fleet(tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any, haproxy_factory: Any,
              test_ca: Any) -> Iterator[tuple[Fleet, PartitionProxy]]:
    """The fleet with node 3 reaching PostgreSQL through a partition proxy; every node serving version 1."""
    port = int(re.search(r"port=(\d+)", postgres).group(1))  # type: ignore[union-attr]
    cut = PartitionProxy(("127.0.0.1", port)).start()
    factories = {"nginx": nginx_factory, "haproxy": haproxy_factory}
    try:
        with start_fleet(tmp_path, pebble_factory(), postgres, factories, test_ca, servers=SERVERS,
                         dsns=[None, None, re.sub(r"port=\d+", f"port={cut.port}", postgres)]) as fleet:
            for node in fleet.nodes:
                node.env.start_daemon()
            wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
            yield fleet, cut
    finally:
        cut.stop()


def cut_mid_order(fleet: Fleet, cut: PartitionProxy, step: str) -> float:
    """Node 3 orders; the CA holds its request to ``step``; node 3 is cut off from the database, then
    the CA answers. Returns when the cut began (node 3's last lease proof was before it)."""
    fleet.ca.hold(step)
    fleet.nodes[2].env.run("renew", "www", "--force", "--reason", "partition test", check=0)
    wait_until(lambda: fleet.ca.held == 1, timeout=30, interval=0.1, what=f"node 3's {step} request at the CA")
    assert len(fleet.ca.orders_created) == 2 and fleet.store.load_order("www") is not None  # journaled
    cut.partition()
    began = time.monotonic()
    fleet.ca.release()
    return began


def taken_over_and_healed(fleet: Fleet, cut: PartitionProxy, began: float) -> None:
    """Nodes 1-2 finish node 3's order after the lease's TTL (one certificate); after the heal node 3
    is fenced, orders nothing and serves that version too."""
    node3 = fleet.nodes[2]
    v1 = fleet.fingerprint(1)
    # the lease (order_timeout 10 s + 35 s) expires, a reachable node resumes the journaled order
    wait_until(lambda: fleet.converged(2, fleet.nodes[:2]), timeout=120, interval=0.5, what="nodes 1-2 on version 2")
    took = time.monotonic() - began
    assert took > 45 - 1, f"another node took the lease {took:.0f} s after node 3's proof, before its TTL"
    assert len(fleet.ca.orders_created) == 2 and len(fleet.ca.finalized) == 2, "a second certificate was issued"
    assert node3.served_valid() == v1  # cut off, it keeps serving what it had
    resumed = [r for r in fleet.store.audit.records if r["event"] == "renewed" and r["version"] == 2]
    assert resumed and resumed[0]["detail"].get("node") in ("node1", "node2"), resumed

    cut.heal()
    wait_until(lambda: fleet.converged(2), timeout=60, interval=0.5, what="node 3 back on version 2 after the heal")
    assert all(node.served_valid() == fleet.fingerprint(2) for node in fleet.nodes)
    one_version(fleet, 2)
    # node 3's own renewal, answered by the database at last, is fenced: it stores and orders nothing
    wait_until(lambda: "renewal_failed" in node3.env.daemons[0].log_text(), timeout=60, interval=0.5,
               what="node 3's held renewal ending")
    assert fleet.status()["desired_version"] == 2 and fleet.store.current("www") == 2
    assert len(fleet.ca.new_orders) == 2 and len(fleet.ca.finalized) == 2, \
        f"node 3 ordered again after the heal: {new_orders_seen(fleet, began)}"


def test_node_cut_off_after_finalize_issues_no_second_certificate(cut_fleet: tuple[Fleet, PartitionProxy]) -> None:
    """Node 3 cut off from the database while the CA finalizes its order: one certificate, which node 1 or 2
    downloads after the lease's TTL; once the partition heals every node (HAProxy too) serves it."""
    fleet, cut = cut_fleet
    began = cut_mid_order(fleet, cut, FINALIZE_PATH)
    wait_until(lambda: len(fleet.ca.finalized) == 2, timeout=30, interval=0.1, what="the CA finalizing node 3's order")
    taken_over_and_healed(fleet, cut, began)


def test_node_cut_off_before_finalize_never_finalizes(cut_fleet: tuple[Fleet, PartitionProxy]) -> None:
    """Node 3 cut off from the database after answering its challenge: its proof before finalize cannot reach the
    database, node 1 or 2 finalizes that order after the lease's TTL, and node 3 never finalizes it (one certificate)."""
    fleet, cut = cut_fleet
    began = cut_mid_order(fleet, cut, CHALLENGE_PATH)
    taken_over_and_healed(fleet, cut, began)
    assert "order_stopped name=www step=finalize" in fleet.nodes[2].env.daemons[0].log_text()  # the proof refused


def test_database_stopped_for_30_s_nodes_keep_serving_order_nothing_and_converge_after(
        tmp_path: Path, pebble_factory: Any, own_postgres: PgCluster, nginx_factory: Any, haproxy_factory: Any,
        test_ca: Any) -> None:
    """PostgreSQL stopped 30 s under three nodes: each keeps serving a valid certificate, none orders; after
    the restart a forced renewal reaches every node (HAProxy too)."""
    factories = {"nginx": nginx_factory, "haproxy": haproxy_factory}
    with start_fleet(tmp_path, pebble_factory(), own_postgres.database(), factories, test_ca,
                     servers=SERVERS) as fleet:
        daemons = [node.env.start_daemon() for node in fleet.nodes]
        wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
        v1 = fleet.fingerprint(1)

        own_postgres.stop()
        outage_ends = time.monotonic() + 30
        handshakes = 0
        while time.monotonic() < outage_ends:  # the outage's length, not a synchronisation
            assert [node.served_valid() for node in fleet.nodes] == [v1] * 3
            assert all(d.alive for d in daemons)
            handshakes += 3
            threading.Event().wait(1)
        forced = fleet.nodes[0].env.run("renew", "www", "--force", "--wait", timeout=60)
        assert forced.returncode == 1 and "the fleet database is unreachable" in forced.stderr, forced
        assert len(fleet.ca.new_orders) == 1 and len(fleet.ca.finalized) == 1, "an order during the outage"

        own_postgres.start()
        back = time.monotonic()
        wait_until(lambda: all("UNREACHABLE" not in node.env.run("status", check=0).stdout for node in fleet.nodes),
                   timeout=30, interval=1, what="every node seeing the database again")
        fleet.renew(fleet.nodes[1])
        wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="every node serving version 2")
        # probe (5 s) + the pool's next connection attempt + one renewal: not the pool's doubling backoff
        took = time.monotonic() - back
        assert took < 15, f"{took:.0f} s from the database's return to every node serving a forced renewal"
        assert all(node.served_valid() == fleet.fingerprint(2) for node in fleet.nodes)
        assert len(fleet.ca.orders_created) == 2 and len(fleet.ca.finalized) == 2
        one_version(fleet, 2)
        print(f"\nfleet outage: {handshakes} verified handshakes during 30 s without the database, 0 orders; "
              f"database back -> renewed on every node: {took:.1f} s")
