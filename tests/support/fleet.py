"""Three ``certd run`` nodes on one PostgreSQL, for the fleet tests (issue 16).

Each node has its own web server (nginx, or HAProxy for a node built with ``server="haproxy"``),
deploy files, reload hook and verify endpoint, and its http-01 responder on a port of its own;
Pebble's validation requests reach them through a round-robin TCP proxy on Pebble's http port
(the load balancer), so a challenge is often answered by a node that did not order. Orders and
finalizations are counted at the CA by the tests.support.hostile_ca proxy.

    with start_fleet(tmp_path, pebble_factory(), dsn, nginx_factory, test_ca) as fleet:
        ...

``dsns`` gives a node a database address of its own (a proxy in front of PostgreSQL, to cut
that node off); ``servers`` picks each node's web server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from certd.config import load
from certd.store.opening import open_cluster
from tests.integration.test_faults import add_root
from tests.support.certd_env import CertdEnv
from tests.support.hostile_ca import HostileCA
from tests.support.procs import free_port
from tests.support.rrproxy import RoundRobinProxy
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"
DOMAINS = [SNI, "example.test"]


def _write_secret(path: Path, data: bytes) -> None:
    """``data`` into ``path``, 0600 from the first byte (a private key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Node:
    """One fleet node: a certd config, its own web server and deploy files, its http-01 port."""

    def __init__(self, name: str, base: Path, pebble: Any, directory: str, dsn: str, kek: Path, roots: Path,
                 server_factory: Callable[..., Any], test_ca: Any, server: str = "nginx") -> None:
        self.name, self.kind = name, server
        self.env = CertdEnv(base / name, pebble)
        self.env.dir.mkdir(parents=True)
        files = self.env.dir / "tls"
        files.mkdir(mode=0o700)
        placeholder = test_ca.issue(SNI)  # the server needs something to serve before the first issuance
        if server == "haproxy":
            self.combined = files / "www.pem"
            _write_secret(self.combined, placeholder.fullchain_pem + placeholder.key_pem)
            self.server = server_factory(self.combined)
        else:
            self.fullchain, self.key = files / "fullchain.pem", files / "privkey.pem"
            self.fullchain.write_bytes(placeholder.fullchain_pem)
            _write_secret(self.key, placeholder.key_pem)
            self.server = server_factory(self.fullchain, self.key, server_name=SNI)
        self.directory, self.dsn, self.kek, self.roots = directory, dsn, kek, roots
        self.http_port = 0

    def _deploy_and_reload(self) -> dict[str, Any]:
        if self.kind == "haproxy":
            return {"deploy": {"files": [{"path": str(self.combined), "content": "combined"}]},
                    "reload": [{"hook": "haproxy", "socket": str(self.server.socket), "crt": self.server.crt}]}
        return {"deploy": {"files": [{"path": str(self.fullchain), "content": "fullchain"},
                                     {"path": str(self.key), "content": "privkey"}]},
                "reload": [{"hook": "nginx", "config": str(self.server.config)}]}

    def configure(self, http_port: int) -> None:
        """Write the node's certd.toml, its http-01 responder on ``http_port``."""
        self.http_port = http_port
        self.env.acme_extra = {"directory": self.directory, "order_timeout": "10s"}
        self.env.tables = {"keys": {"kek_file": str(self.kek)},
                           "cluster": {"database": self.dsn, "node": self.name, "reconcile_interval": "3s"}}
        self.env.write_config([{
            "name": "www", "domains": DOMAINS, "challenge": "http-01", "http01_listen": f"127.0.0.1:{self.http_port}",
            **self._deploy_and_reload(),
            "verify": [{"endpoint": f"127.0.0.1:{self.server.port}", "sni": SNI, "ca_bundle": str(self.roots)}],
            "verify_timeout": "5s"}])

    def served(self) -> str:
        """The fingerprint of the leaf this node's web server hands out (a TLS handshake)."""
        return served_fingerprint(self.server.port, SNI)

    def served_valid(self) -> str:
        """The served leaf's fingerprint from a handshake that verifies it as a client would:
        chain to the fleet's trust anchors, the name, the validity dates (raises otherwise)."""
        ctx = ssl.create_default_context(cafile=str(self.roots))
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


class Fleet:
    def __init__(self, nodes: list[Node], ca: HostileCA, proxy: RoundRobinProxy) -> None:
        self.nodes, self.ca, self.proxy = nodes, ca, proxy
        self.store = open_cluster(load(nodes[0].env.config_path))  # polled: no CLI start-up per look

    def status_cli(self, node: int = 0) -> dict[str, Any]:
        """``certd status --fleet --json``'s one certificate, run on ``nodes[node]``."""
        r = self.nodes[node].env.run("status", "--fleet", "--json", check=0)
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
        """Every node (of ``nodes``) applied ``version``, reports it and its server serves it."""
        cert = self.status()
        if cert["desired_version"] != version:
            return False
        want = self.fingerprint(version)
        rows = {n["node"]: n for n in cert["nodes"]}
        return all(rows.get(n.name, {}).get("applied_version") == version
                   and rows[n.name]["fingerprint_sha256"] == want and n.served() == want
                   for n in nodes or self.nodes)


@contextlib.contextmanager
def start_fleet(tmp_path: Path, peb: Any, dsn: str, factories: dict[str, Callable[..., Any]], test_ca: Any, *,
                dsns: Sequence[str | None] = (), servers: Sequence[str] = ()) -> Iterator[Fleet]:
    """Three nodes (daemons not started) on ``dsn``, one Pebble behind an order-counting proxy.

    ``factories`` maps a server kind ("nginx", "haproxy") to its pytest factory; ``dsns[i]``
    (when given and not None) is node i+1's database address instead of ``dsn``; ``servers[i]``
    its web server (nginx by default). Stops every daemon, proxy and the CA proxy on exit."""
    ca = HostileCA(peb, tmp_path).start()
    roots = tmp_path / "roots.pem"
    add_root(roots, peb)
    kek = tmp_path / "kek"
    _write_secret(kek, os.urandom(32))  # the fleet's shared KEK (`certd kek init`)
    nodes = []
    for i in range(3):
        kind = servers[i] if i < len(servers) else "nginx"
        node_dsn = (dsns[i] if i < len(dsns) else None) or dsn
        nodes.append(Node(f"node{i + 1}", tmp_path, peb, ca.directory_url, node_dsn, kek, roots, factories[kind],
                          test_ca, kind))
    ports: set[int] = set()
    while len(ports) < 3:  # after every server is up (a port picked earlier could have gone to one); not Pebble's
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
