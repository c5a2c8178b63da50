"""keyCompromise in a fleet (issue 17): re-key, every node moves off the old key, the old key is
destroyed on every node and in the database, and only then is the revocation reported complete.

Three nodes of tests.support.fleet (each its own nginx and deploy files), one PostgreSQL, Pebble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from certd.core.model import CertInfo
from tests.integration.test_audit_revoke import holders, key_secrets
from tests.support.fleet import SNI, Fleet, Node, start_fleet
from tests.support.procs import wait_until
from tests.support.server_fixtures import served_leaf


def _served_spki(node: Node) -> str:
    """The SPKI SHA-256 of the leaf ``node``'s nginx hands a TLS client."""
    return CertInfo.from_cert(served_leaf(node.server.port, SNI)).spki_sha256


def _wrapped_copies(dsn: str, spki: str) -> int:
    """Versions in the database that still hold a (sealed) private key with this SPKI."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM certd_versions WHERE info->>'spki_sha256' = %s AND length(key) > 0",
                           (spki,)).fetchone()
    assert row is not None
    return int(row[0])


def _started(fleet: Fleet) -> None:
    for node in fleet.nodes:
        node.env.start_daemon()
    wait_until(lambda: fleet.converged(1), timeout=60, interval=0.5, what="every node serving version 1")


def test_key_compromise_leaves_no_node_serving_or_storing_the_old_key(
        tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any, test_ca: Any) -> None:
    """revoke --reason keyCompromise on one node: every node serves a new key (handshake), no file
    under any node holds the old one, the database keeps no wrapped copy, Pebble says revoked,
    one new order, and the audit log has the fleet-wide completion once."""
    peb = pebble_factory()
    with start_fleet(tmp_path, peb, postgres, {"nginx": nginx_factory}, test_ca) as fleet:
        _started(fleet)
        old = fleet.store.load("www", 1).bundle
        secrets, spki = key_secrets(old.key_pem), old.info.spki_sha256
        assert all(holders(secrets, [n.env.dir]) for n in fleet.nodes)  # the search can see it

        r = fleet.nodes[0].env.run("revoke", "www", "--reason", "keyCompromise", timeout=180)
        served = {n.name: _served_spki(n) != spki for n in fleet.nodes}  # complete: every node moved already
        wait_until(lambda: fleet.converged(2), timeout=30, interval=0.2, what="every node reporting version 2")
        left = {n.name: holders(secrets, [n.env.dir]) for n in fleet.nodes}
        assert left == {n.name: [] for n in fleet.nodes}, left
        assert _wrapped_copies(postgres, spki) == 0 and fleet.store.load_info("www", 1).meta["key_destroyed"]
        status = peb.cert_status(old.info.serial)
        assert status["Status"] == "Revoked" and status["Reason"] == 1, status
        assert len(fleet.ca.orders_created) == 2, "one order for the first issuance, one for the re-key"

        records = fleet.store.audit.records
        (done,) = [a for a in records if a["event"] == "key_compromise_complete"]
        assert done["spki_sha256"] == spki and done["detail"]["nodes"] == ["node1", "node2", "node3"], done
        destroyed_on = {a["detail"].get("node") for a in records if a["event"] == "key_destroyed"}
        assert {"node2", "node3"} <= destroyed_on, destroyed_on
        assert fleet.store.audit.verify().ok
        (compromise,) = fleet.status_cli(1)["compromised_keys"]
        assert compromise["spki_sha256"] == spki and compromise["holding"] == [] and compromise["completed_at"]
        assert r.returncode == 0 and "revocation complete" in r.stdout, r.stdout
        assert served == {n.name: True for n in fleet.nodes}, served


def test_key_compromise_is_not_complete_while_a_live_node_cannot_move_and_completes_when_it_does(
        tmp_path: Path, pebble_factory: Any, postgres: str, nginx_factory: Any, test_ca: Any) -> None:
    """A live node whose reload fails keeps serving (and holding) the old key: revoke exits 1
    naming it; once its reload works again it moves, destroys its copies, and a pass records the
    completion without anyone running revoke again."""
    peb = pebble_factory()
    with start_fleet(tmp_path, peb, postgres, {"nginx": nginx_factory}, test_ca) as fleet:
        stuck = fleet.nodes[2]
        broken = stuck.env.dir / "failreload"
        cert = stuck.env.certificates[0]
        cert["reload"] = [*cert["reload"], {"command": ["/bin/sh", "-c", f"[ ! -e {broken} ]"]}]
        stuck.env.write_config()
        _started(fleet)
        old = fleet.store.load("www", 1).bundle
        secrets, spki = key_secrets(old.key_pem), old.info.spki_sha256
        broken.touch()

        r = fleet.nodes[0].env.run("revoke", "www", "--reason", "keyCompromise", timeout=180, check=1)
        assert "revocation NOT complete" in r.stdout and "node(s) node3 still hold" in r.stdout, r.stdout
        assert "certd nodes remove" in r.stdout
        assert all(holders(secrets, [n.env.dir]) == [] for n in fleet.nodes[:2])
        (compromise,) = fleet.status_cli(0)["compromised_keys"]
        assert compromise["holding"] == ["node3"] and compromise["completed_at"] is None
        assert not [a for a in fleet.store.audit.records if a["event"] == "key_compromise_complete"]

        broken.unlink()  # fixed: its next pass applies version 2, destroys the old key, the fleet completes
        wait_until(lambda: [a for a in fleet.store.audit.records if a["event"] == "key_compromise_complete"],
                   timeout=60, interval=0.5, what="the completion recorded by a reconcile pass")
        assert _served_spki(stuck) != spki and holders(secrets, [stuck.env.dir]) == []
        (done,) = [a for a in fleet.store.audit.records if a["event"] == "key_compromise_complete"]
        assert done["detail"]["nodes"] == ["node1", "node2", "node3"], done
        assert len(fleet.ca.orders_created) == 2
