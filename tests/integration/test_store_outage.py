"""A fleet node while its database is down: PostgreSQL (a private cluster of this test's own)
is stopped under a running ``certd run``; the node keeps its deployed files untouched, its
``certd_store_up`` gauge and ``certd status`` say the database is unreachable, and both recover
when the database is back. The operator's renewal refused during the outage is audited: spooled
on the node, it lands in the fleet's chain once the database is back, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_backup import tree
from tests.integration.test_cluster_import import join_fleet, single_host
from tests.integration.test_monitoring import samples, value
from tests.support.certd_env import CertdEnv
from tests.support.postgres import PgCluster
from tests.support.procs import free_port, wait_until


def store_up(port: int) -> float | None:
    """certd_store_up{node="web1"}; None when a scrape fails (one may wait on the database in the
    seconds before the probe notices it is gone)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=40).text
    except httpx.HTTPError:
        return None
    return value(samples(text), "certd_store_up", node="web1")



def test_database_outage_keeps_serving_and_status_metric_and_audit_say_so(tmp_path: Path, pebble: Any,
                                                                   own_postgres: PgCluster) -> None:
    """Database stopped: store_up 0, status UNREACHABLE, renew refused and audited after recovery once; files kept."""
    env = single_host(tmp_path, pebble)
    live = env.dir / "live"
    join_fleet(env, own_postgres.database(), "web1")
    env.run("cluster", "import", check=0)
    port = free_port()
    env.daemon_extra = {"metrics_listen": f"127.0.0.1:{port}"}
    env.write_config()
    before = env.status()
    daemon = env.start_daemon()
    try:
        outage(env, own_postgres, port, before, live, daemon)
    finally:
        env.close()


def outage(env: CertdEnv, pg: PgCluster, port: int, before: dict[str, Any], live: Path, daemon: Any) -> None:
    """Stop the database under the running daemon, check what it says, start it again."""
    wait_until(lambda: store_up(port) == 1.0, timeout=30,
               what="certd_store_up 1")
    deployed = tree(live)
    events = {r["event"] for r in json.loads(env.run("history", "--json", check=0).stdout)["records"]}
    assert "imported" in events  # the daemon reads the fleet's chain, where the import wrote

    pg.stop()
    wait_until(lambda: store_up(port) == 0.0, timeout=90,
               what="certd_store_up 0 with the database stopped")
    out = env.run("status", check=0).stdout
    assert "database: UNREACHABLE from node web1 since" in out, out
    rows = env.status()
    assert rows["www"]["state"] == "store_unreachable"
    assert (rows["www"]["version"], rows["www"]["serial"]) == (before["www"]["version"], before["www"]["serial"])
    expiry = value(samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text),
                   "certd_certificate_expiration_timestamp_seconds", name="www")
    assert expiry is not None  # the last value, kept while the database is down
    assert tree(live) == deployed and daemon.alive
    forced = env.run("renew", "--force", "www", "--wait", timeout=60)  # no order without the database
    assert forced.returncode == 1 and forced.stderr.count("\n") == 1, forced
    assert "the fleet database is unreachable from node web1" in forced.stderr
    assert tree(live) == deployed and daemon.alive
    after = value(samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text),
                  "certd_certificate_expiration_timestamp_seconds", name="www")
    assert after == expiry  # the refusal's audit record does not blank the gauge the expiry alerts read

    spool = env.state_dir / "audit.spool.jsonl"
    wait_until(lambda: spool.exists() and b"renew_refused" in spool.read_bytes(), timeout=30,
               what="the refusal spooled on the node")

    pg.start()
    wait_until(lambda: store_up(port) == 1.0, timeout=30,
               what="certd_store_up 1 once the database is back")
    wait_until(lambda: "UNREACHABLE" not in env.run("status", check=0).stdout, timeout=30,
               what="status without the unreachable line")
    assert env.status()["www"]["state"] != "store_unreachable"
    assert tree(live) == deployed and daemon.alive
    wait_until(lambda: spool.stat().st_size == 0, timeout=30, what="the spool replayed and emptied")
    records = json.loads(env.run("history", "--json", check=0).stdout)["records"]
    refused = [r for r in records if r["event"] == "renew_refused"]
    assert len(refused) == 1, refused
    assert refused[0]["name"] == "www" and refused[0]["detail"]["node"] == "web1"
    assert refused[0]["initiator"] and "unreachable" in refused[0]["reason"]
    env.run("audit", "verify", check=0)
