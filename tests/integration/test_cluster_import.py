"""``certd cluster import`` end to end: a single host's state dir made by real renewals against
Pebble moves into a private PostgreSQL database; the state dir is left byte for byte as it was,
``certd status`` on the [cluster] config shows the same versions, and the audit chain verifies."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from certd.core.events import LifecycleEvent
from certd.store.pg import PgStore

from tests.integration.test_backup import tree
from tests.support.certd_env import CertdEnv
from tests.support.postgres import PgCluster

SNI = "www.example.test"


def single_host(tmp_path: Path, pebble: Any) -> CertdEnv:
    """A host with [keys] whose state dir holds www (3 versions) and api (1), issued by Pebble."""
    env = CertdEnv(tmp_path / "host", pebble)
    env.dir.mkdir()
    env.refresh_root()
    env.tables = {"keys": {"kek_file": str(env.dir / "kek")}}
    env.write_config([env.http_cert("www", [SNI], keep_versions=5, deploy={"live_dir": str(env.dir / "live/www")}),
                      env.http_cert("api", ["api.example.test"], deploy={"live_dir": str(env.dir / "live/api")})])
    env.run("kek", "init", check=0)
    for _ in range(3):
        env.run("renew", "--force", "www", "--reason", "before the fleet", check=0)
    env.run("renew", "--force", "api", check=0)
    return env


def join_fleet(env: CertdEnv, dsn: str, node: str) -> None:
    env.tables = {**env.tables, "cluster": {"database": dsn, "node": node}}
    env.write_config()


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def test_cluster_import_moves_a_state_dir_and_status_and_audit_follow(tmp_path: Path, pebble: Any,
                                                                      postgres: str) -> None:
    """The state dir moves whole (keys sealed), stays unchanged; status, audit verify, a renewal follow; reruns are no-ops."""
    env = single_host(tmp_path, pebble)
    before = env.status()
    files = tree(env.state_dir)
    file_records = len(env.run("history", "--json", check=0).stdout.splitlines())
    exported_head = json.loads((env.state_dir / "audit.head").read_text())["hash"]  # as journald kept it
    join_fleet(env, postgres, "web1")

    r = env.run("cluster", "import", check=0)
    assert "imported 2 certificates (4 versions), 1 ACME account and" in r.stdout, r.stdout
    assert "audit records copied" in r.stdout
    assert "www: versions 1-3 (3), desired 3, applied here 3" in r.stdout
    assert tree(env.state_dir) == files  # nothing written to the state dir

    after = env.status()
    for name in ("www", "api"):
        assert {k: after[name][k] for k in ("version", "serial", "fingerprint_sha256", "not_after")} == \
               {k: before[name][k] for k in ("version", "serial", "fingerprint_sha256", "not_after")}
    assert rows(postgres, "SELECT node, name, version FROM certd_applied ORDER BY name") == \
        [("web1", "api", 1), ("web1", "www", 3)]
    assert all(b"PRIVATE KEY" not in bytes(k) for (k,) in rows(postgres, "SELECT key FROM certd_versions"))
    assert len(rows(postgres, "SELECT directory FROM certd_accounts")) == 1

    v = env.run("audit", "verify", check=0)
    assert "chain intact" in v.stdout
    assert "chain intact" in env.run("audit", "verify", "--head", exported_head, check=0).stdout  # across the seam
    history = json.loads(env.run("history", "--json", check=0).stdout)["records"]
    assert len(history) > file_records  # the host's records, then the import's
    imported = [h for h in history if h["event"] == "imported"]
    assert {h["name"] for h in imported} == {"www", "api", ""}
    assert all(h["initiator"].startswith("uid=") for h in imported)

    env.run("renew", "--force", "www", "--reason", "first in the fleet", check=0)  # the imported account orders
    assert rows(postgres, "SELECT version, meta->>'replaces' IS NOT NULL FROM certd_versions "
                          "WHERE name = 'www' ORDER BY version DESC LIMIT 1") == [(4, True)]  # ARI replaces accepted
    assert len(rows(postgres, "SELECT directory FROM certd_accounts")) == 1  # no new registration
    assert tree(env.state_dir) == files

    again = env.run("cluster", "import", check=0)
    assert "www: already imported from this state dir" in again.stdout
    assert "imported 0 certificates (0 versions), 0 ACME accounts (and 1 the database had already)" in again.stdout
    assert len(rows(postgres, "SELECT * FROM certd_versions")) == 5  # 4 imported, 1 renewed, none twice
    assert tree(env.state_dir) == files


def test_cluster_import_into_a_running_fleet_pins_the_log_and_refuses_taken_names(tmp_path: Path, pebble: Any,
                                                                                  postgres: str) -> None:
    """Into a fleet with a chain the host log is pinned (cutting it fails audit verify); taken names are refused."""
    env = single_host(tmp_path, pebble)
    with PgStore(postgres, node="web0") as fleet:  # the fleet ran before this host joined
        fleet.audit.append(LifecycleEvent("config_changed", "", datetime.now(timezone.utc), initiator="web0"))
    join_fleet(env, postgres, "web1")
    r = env.run("cluster", "import", check=0)
    assert "pins this log's head" in r.stdout, r.stdout
    assert "chain intact" in env.run("audit", "verify", check=0).stdout

    audit_rows = rows(postgres, "SELECT count(*) FROM certd_audit")
    join_fleet(env, postgres, "web2")  # the same names, but another node's state dir as far as the database knows
    refused = env.run("cluster", "import", check=2)
    assert refused.stderr.count("\n") == 1 and "already holds api, www" in refused.stderr, refused.stderr
    assert rows(postgres, "SELECT count(*) FROM certd_audit") == audit_rows
    skipped = env.run("cluster", "import", "--skip-existing", check=0)
    assert "www: skipped: the database already holds it" in skipped.stdout
    assert rows(postgres, "SELECT count(*) FROM certd_versions") == [(4,)]

    join_fleet(env, postgres, "web1")
    log = env.state_dir / "audit.jsonl"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))  # the host's last record cut
    v = env.run("audit", "verify", check=1)
    assert "audit.jsonl (imported at seq" in v.stdout and "TAMPERED" in v.stdout, v.stdout


def test_cluster_import_without_cluster_section_is_one_line(tmp_path: Path, pebble: Any,
                                                            postgres_cluster: PgCluster) -> None:
    """On a config without [cluster], the import says what to add and exits 2."""
    env = CertdEnv(tmp_path / "host", pebble)
    env.dir.mkdir()
    env.write_config([env.http_cert("www", [SNI])])
    r = env.run("cluster", "import", check=2)
    assert r.stderr.count("\n") == 1 and "has no [cluster] section" in r.stderr
