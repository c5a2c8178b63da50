"""``[cluster]``: a node of a fleet is configured, checked and pointed at the shared database.

Bad values give one actionable line each; a good section opens the PostgreSQL store (a private
cluster, tests/support/postgres.py) with the password read from ``password_file``; without
``[cluster]`` the state directory is used exactly as before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from certd import config
from certd.config.cluster import has_password
from certd.core.errors import ConfigError, StoreError
from certd.store.files import FileStore
from certd.store.opening import cluster_dsn, open_store

ACME = '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'


def _kek(tmp_path: Path) -> Path:
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    return kek


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "certd.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def _keys(tmp_path: Path) -> str:
    return f'[keys]\nkek_file = "{_kek(tmp_path)}"\n'


@pytest.mark.parametrize("section,fragments", [
    ('database = "postgresql://certd:hunter2@db.example.test/certd"\n', ("cluster.database", "holds a password",
                                                                          "password_file")),
    ('database = "host=db port=5432 password=hunter2"\n', ("cluster.database", "holds a password")),
    ('database = "postgresql://db/certd?password=x"\n', ("cluster.database", "holds a password")),
    ('database = ""\n', ("cluster.database", "empty")),
    ('node = "web-1"\n', ("cluster.database", "required key is missing")),
    ('database = "postgresql://db/certd"\nsslmode = "verify"\n', ("cluster.sslmode", "verify-full")),
    ('database = "postgresql://db/certd"\nnode = "web 1"\n', ("cluster.node", "letters, digits")),
    ('database = "postgresql://db/certd"\nreconcile_interval = "soon"\n', ("cluster.reconcile_interval",
                                                                          "positive duration")),
    ('database = "postgresql://db/certd"\npassword_file = "/nonexistent/pw"\n', ("cluster.password_file",
                                                                                 "does not exist")),
    ('database = "postgresql://db/certd"\nsslrootcert = "/nonexistent/ca.pem"\n', ("cluster.sslrootcert",
                                                                                   "does not exist")),
    ('database = "postgresql://db/certd"\nleader = true\n', ("cluster.leader", "unknown key")),
], ids=["uri-password", "kv-password", "query-password", "empty", "no-database", "sslmode", "node", "interval",
        "password-file-missing", "rootcert-missing", "unknown-key"])
def test_bad_cluster_section_gives_one_actionable_line(tmp_path, section, fragments):
    """Each broken [cluster] yields one line naming the key and the fix; nothing is opened."""
    path = _write(tmp_path, ACME + _keys(tmp_path) + "[cluster]\n" + section)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert len(exc.value.problems) == 1, exc.value.problems
    for fragment in fragments:
        assert fragment in exc.value.problems[0]


def test_cluster_without_keys_is_refused(tmp_path):
    """A fleet keeps keys in a shared database, so [cluster] without [keys] is a config error."""
    path = _write(tmp_path, ACME + '[cluster]\ndatabase = "postgresql://db/certd"\n')
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert "[cluster] needs [keys]" in exc.value.problems[0]


def test_password_file_others_can_read_is_refused(tmp_path):
    """The database password file must be private: mode 0644 is refused with the chmod to run."""
    pw = tmp_path / "db.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    path = _write(tmp_path, ACME + _keys(tmp_path) + f'[cluster]\ndatabase = "postgresql://db/certd"\n'
                                                   f'password_file = "{pw}"\n')
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert f"chmod 600 {pw}" in exc.value.problems[0]
    assert "s3cret" not in exc.value.problems[0]


def test_good_cluster_section_parses_with_defaults(tmp_path):
    """A minimal [cluster] names the host as the node and reconciles every 30 s."""
    path = _write(tmp_path, ACME + _keys(tmp_path) + '[cluster]\ndatabase = "postgresql://db/certd"\n'
                                                   'sslmode = "verify-full"\nreconcile_interval = "10s"\n')
    cluster = config.load(path).cluster
    assert cluster is not None
    assert cluster.node and cluster.sslmode == "verify-full" and cluster.reconcile_interval == 10.0
    assert config.load(_write(tmp_path, ACME)).cluster is None


def test_password_detection_covers_both_libpq_forms():
    """Passwords are found in URIs (user:pw@, ?password=) and key=value strings, not elsewhere."""
    assert has_password("postgres://u:p@h/db") and has_password("host=h  password = x")
    assert not has_password("postgresql://u@h/db?sslmode=require") and not has_password("host=h passfile=/x")


def test_dsn_gets_password_and_tls_settings_from_the_files(tmp_path):
    """The connection string carries the password file's content and the configured TLS settings."""
    pw = tmp_path / "db.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    path = _write(tmp_path, ACME + _keys(tmp_path) + f'[cluster]\ndatabase = "postgresql://certd@db/certd"\n'
                                                   f'password_file = "{pw}"\nsslmode = "verify-full"\n'
                                                   f'sslrootcert = "{ca}"\n')
    cluster = config.load(path).cluster
    assert cluster is not None
    dsn = cluster_dsn(cluster)
    assert "password=s3cret" in dsn and "sslmode=verify-full" in dsn and f"sslrootcert={ca}" in dsn
    pw.chmod(0o640)  # loosened after the config was checked: refused when connecting
    with pytest.raises(StoreError, match="chmod 600"):
        cluster_dsn(cluster)


def _require_password(cluster, conn) -> None:
    """Make the private cluster (trust by default) ask certd_node for its password on certd_fleet."""
    hba = cluster.base / "data" / "pg_hba.conf"
    rule = "host certd_fleet certd_node 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if rule not in text:
        hba.write_text(rule + text)
    conn.execute("SELECT pg_reload_conf()")
    import psycopg
    dsn = f"host=127.0.0.1 port={cluster.port} user=certd_node dbname=certd_fleet password=wrong"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the postmaster re-reads pg_hba.conf asynchronously
        try:
            psycopg.connect(dsn).close()
        except psycopg.OperationalError:
            return
        time.sleep(0.05)
    raise AssertionError("pg_hba.conf rule not in effect after 10 s")


def test_open_store_uses_the_database_with_cluster_and_the_state_dir_without(tmp_path, postgres_cluster):
    """With [cluster] the node's store is the shared database (its password from password_file);
    without it, the state directory as before."""
    import psycopg
    from certd.store.pg import PgStore

    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS certd_node")
        conn.execute("CREATE ROLE certd_node LOGIN PASSWORD 'n0de-pw' CREATEDB")
        conn.execute("DROP DATABASE IF EXISTS certd_fleet")
        conn.execute("CREATE DATABASE certd_fleet OWNER certd_node")
        _require_password(postgres_cluster, conn)
    pw = tmp_path / "db.password"
    pw.write_text("n0de-pw\n")
    pw.chmod(0o600)
    dsn = f"postgresql://certd_node@127.0.0.1:{postgres_cluster.port}/certd_fleet"
    text = ACME + _keys(tmp_path) + f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
    cfg = config.load(_write(tmp_path, text + f'[cluster]\ndatabase = "{dsn}"\npassword_file = "{pw}"\n'
                                              'node = "web-1"\n'))
    store = open_store(cfg)
    try:
        assert isinstance(store, PgStore) and store.node == "web-1"
        assert store.names() == []
    finally:
        store.close()  # type: ignore[attr-defined]
    pw.write_text("wrong\n")
    with pytest.raises(StoreError, match="password authentication failed"):
        open_store(cfg)
    assert isinstance(open_store(config.load(_write(tmp_path, text))), FileStore)
