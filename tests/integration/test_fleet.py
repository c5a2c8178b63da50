"""Three ``certd run`` nodes on one private PostgreSQL behave as one certd (issue 16, part 1).

Each node has its own nginx, deploy files, reload hook and verify endpoint, and its http-01
responder on a port of its own; Pebble's validation requests reach them through a round-robin
TCP proxy on Pebble's http port (the load balancer), so a challenge is often answered by a node
that did not order. Orders are counted at the CA by the tests.support.hostile_ca proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from certd.config import load
from certd.store.opening import open_cluster
from tests.integration.test_faults import add_root
from tests.support.certd_env import ROOT, CertdEnv
from tests.support.hostile_ca import HostileCA
from tests.support.procs import free_port, wait_until
from tests.support.rrproxy import RoundRobinProxy
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"
DOMAINS = [SNI, "example.test"]


class Node:
    """One fleet node: a certd config, its own nginx and deploy files, its http-01 port."""

    def __init__(self, name: str, base: Path, pebble: Any, directory: str, dsn: str, kek: Path, roots: Path,
                 nginx_factory: Any, test_ca: Any) -> None:
        self.name = name
        self.env = CertdEnv(base / name, pebble)
        self.env.dir.mkdir(parents=True)
        files = self.env.dir / "tls"
        files.mkdir(mode=0o700)
        self.fullchain, self.key = files / "fullchain.pem", files / "privkey.pem"
        placeholder = test_ca.issue(SNI)  # nginx needs something to serve before the first issuance
        self.fullchain.write_bytes(placeholder.fullchain_pem)
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(placeholder.key_pem)
        self.nginx = nginx_factory(self.fullchain, self.key, server_name=SNI)
        self.directory, self.dsn, self.kek, self.roots = directory, dsn, kek, roots
        self.http_port = 0

    def configure(self, http_port: int) -> None:
        """Write the node's certd.toml, its http-01 responder on ``http_port``."""
        self.http_port = http_port
        directory, dsn, kek, roots = self.directory, self.dsn, self.kek, self.roots
        name = self.name
        self.env.acme_extra = {"directory": directory, "order_timeout": "10s"}
        self.env.tables = {"keys": {"kek_file": str(kek)},
                           "cluster": {"database": dsn, "node": name, "reconcile_interval": "3s"}}
        self.env.write_config([{
            "name": "www", "domains": DOMAINS, "challenge": "http-01", "http01_listen": f"127.0.0.1:{self.http_port}",
            "deploy": {"files": [{"path": str(self.fullchain), "content": "fullchain"},
                                 {"path": str(self.key), "content": "privkey"}]},
            "reload": [{"hook": "nginx", "config": str(self.nginx.config)}],
            "verify": [{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(roots)}],
            "verify_timeout": "5s"}])

    def served(self) -> str:
        return served_fingerprint(self.nginx.port, SNI)


class Fleet:
    def __init__(self, nodes: list[Node], ca: HostileCA, proxy: RoundRobinProxy) -> None:
        self.nodes, self.ca, self.proxy = nodes, ca, proxy
        self.store = open_cluster(load(nodes[0].env.config_path))  # polled: no CLI start-up per look

    def status_cli(self) -> dict[str, Any]:
        """``certd status --fleet --json``'s one certificate, run on node 1."""
        r = self.nodes[0].env.run("status", "--fleet", "--json", check=0)
        (cert,) = json.loads(r.stdout)["certificates"]
        return dict(cert)

    def status(self) -> dict[str, Any]:
        return dict(self.store.fleet.status(["www"])["certificates"][0])

    def committed_at(self, version: int) -> float:
        """When the renewal to ``version`` committed (its ``renewed`` audit record), as a Unix time."""
        (record,) = [r for r in self.store.audit.records if r["event"] == "renewed" and r["version"] == version]
        return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()

    def fingerprint(self, version: int) -> str:
        return str(self.store.load_info("www", version).info.fingerprint_sha256)

    def renew(self, node: Node, **env: str) -> None:
        """``certd renew www --force --wait`` on ``node`` (through its daemon): returns once committed."""
        node.env.run("renew", "www", "--force", "--wait", "--reason", "fleet test", check=0, env=env)

    def converged(self, version: int, nodes: list[Node] | None = None) -> bool:
        """Every node (of ``nodes``) applied ``version``, reports it and its nginx serves it."""
        cert = self.status()
        if cert["desired_version"] != version:
            return False
        want = self.fingerprint(version)
        rows = {n["node"]: n for n in cert["nodes"]}
        return all(rows.get(n.name, {}).get("applied_version") == version
                   and rows[n.name]["fingerprint_sha256"] == want and n.served() == want
                   for n in nodes or self.nodes)


@pytest.fixture
def fleet(tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any, test_ca: Any) -> Iterator[Fleet]:
    """Three nodes (daemons not started), one Pebble behind an order-counting proxy, one database."""
    peb = pebble_factory()
    ca = HostileCA(peb, tmp_path).start()
    roots = tmp_path / "roots.pem"
    add_root(roots, peb)
    kek = tmp_path / "kek"
    fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the fleet's shared KEK (`certd kek init`)
    os.write(fd, os.urandom(32))
    os.close(fd)
    nodes = [Node(f"node{i}", tmp_path, peb, ca.directory_url, postgres, kek, roots, nginx_factory, test_ca)
             for i in (1, 2, 3)]
    ports: set[int] = set()
    while len(ports) < 3:  # after every nginx is up (a port picked earlier could have gone to one); not Pebble's
        ports.add(free_port())
        ports -= {peb.http_port, peb.tls_port}
    for node, port in zip(nodes, sorted(ports)):
        node.configure(port)
    proxy = RoundRobinProxy(("127.0.0.1", peb.http_port), [("127.0.0.1", n.http_port) for n in nodes]).start()
    fleet = Fleet(nodes, ca, proxy)
    try:
        yield fleet
    finally:
        for n in nodes:
            n.env.close()
        fleet.store.close()
        proxy.stop()
        ca.stop()


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


def test_ordering_node_killed_between_new_order_and_finalize_another_completes_it(fleet: Fleet) -> None:
    """The ordering node SIGKILLed after newOrder, before finalize: another node finishes that order; one certificate."""
    daemons = [node.env.start_daemon() for node in fleet.nodes]
    wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")
    daemons[0].stop(timeout=30)
    fleet.nodes[0].env.daemons.clear()
    crashing = fleet.nodes[0].env.start_daemon(env={"CERTD_CRASH_AT": "order_journaled"})
    wait_until(lambda: "daemon_ready" in crashing.log_text(), timeout=30, what="node 1 ready")
    fleet.nodes[0].env.run("renew", "www", "--force", "--wait")  # its daemon dies mid-order
    wait_until(lambda: not crashing.alive, timeout=30, what="node 1 killed mid-order")
    assert len(fleet.ca.orders_created) == 2 and len(fleet.ca.finalized) == 1
    # the lease outlives the dead holder by its TTL (order_timeout 10 s + 35 s), then node 2 or 3 resumes
    wait_until(lambda: fleet.converged(2, fleet.nodes[1:]), timeout=90, interval=0.5, what="nodes 2-3 on version 2")
    assert len(fleet.ca.orders_created) == 2, "a second order was placed instead of finishing the first"
    assert len(fleet.ca.finalized) == 2 and fleet.store.load_order("www") is None
    fleet.nodes[0].env.daemons.clear()
    fleet.nodes[0].env.start_daemon()
    wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="node 1 back on version 2")
