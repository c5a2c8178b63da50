"""Three ``certd run`` nodes on one private PostgreSQL behave as one certd (issue 16, part 1).

The fleet (three nodes with their own nginx, the round-robin proxy standing in for the load
balancer, the order-counting CA proxy) is tests.support.fleet's; the faults are in
test_fleet_faults.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.certd_env import ROOT
from tests.support.fleet import Fleet, start_fleet
from tests.support.procs import wait_until


@pytest.fixture
def fleet(tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any, test_ca: Any) -> Iterator[Fleet]:
    """Three nodes (daemons not started), one Pebble behind an order-counting proxy, one database."""
    with start_fleet(tmp_path, pebble_factory(), postgres, {"nginx": nginx_factory}, test_ca) as fleet:
        yield fleet


def test_three_nodes_order_once_and_all_serve_each_version(fleet: Fleet) -> None:
    """Three nodes: one order for the first issuance and one per forced renewal, every nginx serves each new version."""
    for node in fleet.nodes:
        node.env.start_daemon()
    wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
    assert len(fleet.ca.orders_created) == 1, "the nodes ordered more than once for the first issuance"
    assert len(fleet.ca.finalized) == 1
    assert sum(1 for c in fleet.proxy.counts if c) >= 1

    took = []
    for version in (2, 3, 4):  # forced from a different node each time; 4 issuances stay under the CA's 5 a week
        fleet.renew(fleet.nodes[version % 3])
        wait_until(lambda v=version: fleet.converged(v), timeout=30, interval=0.02, what=f"every node serving {version}")
        took.append(time.time() - fleet.committed_at(version))
        assert len(fleet.ca.orders_created) == version and len(fleet.ca.finalized) == version
    took.sort()
    print(f"\nfleet: committed renewal -> every node serving it: p50 {took[1]:.2f} s, max {took[2]:.2f} s "
          f"(3 renewals); orders per renewal: 1")
    # renew --force on all three nodes at once: one order (the lease; under it, the others see the new version)
    procs = [subprocess.Popen(n.env.argv("renew", "www", "--force", "--wait"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT) for n in fleet.nodes]
    said = [p.communicate(timeout=120)[0] for p in procs]
    assert len(fleet.ca.orders_created) == 5, said
    assert sum("renewed meanwhile" in text for text in said) == 2, said
    wait_until(lambda: fleet.converged(5), timeout=30, interval=0.1, what="every node serving version 5")
    cert = fleet.status_cli()
    assert {n["applied_version"] for n in cert["nodes"]} == {5} and cert["desired_version"] == 5
    assert cert["release"] is None and sorted(n["node"] for n in cert["nodes"]) == ["node1", "node2", "node3"]
    assert all(n["verified_at"] and n["last_error"] is None for n in cert["nodes"])
    r = fleet.nodes[0].env.run("nodes", check=0)
    assert all(n.name in r.stdout for n in fleet.nodes), r.stdout
    fleet.nodes[0].env.run("nodes", "remove", "node3", "--reason", "decommissioned", check=0)
    assert [n["node"] for n in fleet.status_cli()["nodes"]] == ["node1", "node2"]
    removed = [r for r in fleet.store.audit.records if r["event"] == "node_removed"]
    assert removed[-1]["detail"] == {"node": "node1", "removed_node": "node3"} and removed[-1]["initiator"]
    assert "no node 'node9'" in fleet.nodes[0].env.run("nodes", "remove", "node9", check=2).stderr


def test_a_node_stopped_during_a_renewal_catches_up_when_started(fleet: Fleet) -> None:
    """A node stopped (SIGTERM) while the fleet renews applies the new version as soon as it starts again."""
    daemons = [node.env.start_daemon() for node in fleet.nodes]
    wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
    daemons[2].stop(timeout=30)
    fleet.renew(fleet.nodes[0])
    wait_until(lambda: fleet.converged(2, fleet.nodes[:2]), timeout=30, interval=0.2, what="nodes 1-2 on version 2")
    rows = {n["node"]: n for n in fleet.status()["nodes"]}
    assert fleet.nodes[1].env.status("www")["www"]["version"] == 2  # the daemon's own status reads the database
    table = fleet.nodes[0].env.run("status", "--fleet", check=0).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "DESIRED", "NODE", "APPLIED", "IN_SYNC"]
    assert [line.split()[2:5] for line in table[1:]] == [["node1", "2", "yes"], ["node2", "2", "yes"],
                                                        ["node3", "1", "NO"]]
    assert rows["node3"]["applied_version"] == 1 and fleet.nodes[2].served() == fleet.fingerprint(1)
    fleet.nodes[2].env.daemons.clear()
    fleet.nodes[2].env.start_daemon()
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="node 3 catching up on version 2")
    assert len(fleet.ca.orders_created) == 2


def kill_node1_renewing(fleet: Fleet, crash_at: str) -> None:
    """Every node serving version 1; then node 1's daemon, started with ``CERTD_CRASH_AT=crash_at``,
    is asked for a forced renewal and SIGKILLs itself at that point."""
    daemons = [node.env.start_daemon() for node in fleet.nodes]
    wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
    daemons[0].stop(timeout=30)
    fleet.nodes[0].env.daemons.clear()
    crashing = fleet.nodes[0].env.start_daemon(env={"CERTD_CRASH_AT": crash_at})
    wait_until(lambda: "daemon_ready" in crashing.log_text(), timeout=30, what="node 1 ready")
    fleet.nodes[0].env.run("renew", "www", "--force", "--wait", check=None)
    wait_until(lambda: not crashing.alive, timeout=30, what=f"node 1 killed at {crash_at}")


@pytest.mark.parametrize("point", ["order_journaled", "order_created"])
def test_ordering_node_killed_between_new_order_and_finalize_another_completes_it(fleet: Fleet, point: str) -> None:
    """The ordering node SIGKILLed after newOrder, before finalize (``order_created``: before even its URL was journaled, so only the intent journaled before newOrder and the account's orders list find it): another node finishes that order; one certificate."""
    kill_node1_renewing(fleet, point)  # its daemon dies mid-order
    assert len(fleet.ca.orders_created) == 2 and len(fleet.ca.finalized) == 1
    # the lease outlives the dead holder by its TTL (order_timeout 10 s + 35 s), then node 2 or 3 resumes
    wait_until(lambda: fleet.converged(2, fleet.nodes[1:]), timeout=90, interval=0.5, what="nodes 2-3 on version 2")
    assert len(fleet.ca.orders_created) == 2, "a second order was placed instead of finishing the first"
    assert len(fleet.ca.finalized) == 2 and fleet.store.load_order("www") is None
    fleet.nodes[0].env.daemons.clear()
    fleet.nodes[0].env.start_daemon()
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="node 1 back on version 2")


def test_ordering_node_killed_before_journaling_its_rotation_another_rolls_the_version_out(fleet: Fleet) -> None:
    """The ordering node SIGKILLed after storing version 2, before any rotation journal or release points to it: another node rolls version 2 out instead of ordering again; the CA saw one order for the renewal."""
    kill_node1_renewing(fleet, "version_stored")
    assert fleet.store.versions("www") == [1, 2] and fleet.store.desired("www") == 1
    assert fleet.store.load_order("www") is not None  # kept until a rotation journal or release points to 2
    # the lease outlives the dead holder by its TTL, then node 2 or 3 finds the journaled order's version
    wait_until(lambda: fleet.converged(2, fleet.nodes[1:]), timeout=90, interval=0.5, what="nodes 2-3 on version 2")
    assert len(fleet.ca.orders_created) == 2, "a second certificate was ordered for one renewal"
    assert fleet.store.versions("www") == [1, 2] and fleet.store.load_order("www") is None
    (adopted,) = [r for r in fleet.store.audit.records if r["event"] == "version_adopted"]
    assert adopted["version"] == 2 and adopted["detail"]["left_at"] == "stored"
    fleet.nodes[0].env.daemons.clear()
    fleet.nodes[0].env.start_daemon()
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="node 1 back on version 2")
    assert fleet.store.desired("www") == 2 and len(fleet.ca.orders_created) == 2


def test_ordering_node_killed_after_storing_the_version_another_rolls_it_out(fleet: Fleet) -> None:
    """The ordering node SIGKILLed after storing the new version, before rolling it out: another node rolls that version out to the fleet; one certificate, and the node that died serves it once back."""
    kill_node1_renewing(fleet, "issued")  # its daemon dies after storing version 2
    assert fleet.store.versions("www") == [1, 2] and fleet.store.desired("www") == 1
    # the lease outlives the dead holder by its TTL, then node 2 or 3 rolls version 2 out
    wait_until(lambda: fleet.converged(2, fleet.nodes[1:]), timeout=90, interval=0.5, what="nodes 2-3 on version 2")
    assert len(fleet.ca.orders_created) == 2, "a second certificate was ordered for one renewal"
    assert fleet.store.versions("www") == [1, 2]
    (adopted,) = [r for r in fleet.store.audit.records if r["event"] == "version_adopted"]
    assert adopted["version"] == 2 and adopted["detail"]["stored_by"] == "node1"
    fleet.nodes[0].env.daemons.clear()
    fleet.nodes[0].env.start_daemon()
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="node 1 back on version 2")
    assert fleet.store.desired("www") == 2 and len(fleet.ca.orders_created) == 2
