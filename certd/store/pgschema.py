"""The PostgreSQL store's schema (:mod:`certd.store.pg`), versioned, and how it connects.

``certd_schema`` holds one row, the schema version. :func:`ensure_schema` creates the tables
when the row is missing, under a transaction-scoped advisory lock, so nodes starting at the
same moment create them once; a database of a newer version is refused (a newer certd wrote
it). Every table is prefixed ``certd_`` so the database may be shared with other programs.

Private keys (``certd_versions.key``, ``certd_orders.key``, ``certd_accounts.key``) hold sealed
keys only (:class:`certd.crypto.custody.KeyRing`); an empty ``key`` is a destroyed one.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from certd.core.errors import StoreError

VERSION = 6
#: pg_advisory_xact_lock key for schema creation and upgrades ("certd" in ASCII).
SCHEMA_LOCK = 0x6365727464

#: libpq settings a DSN does not set itself: a node cut off from the database notices within
#: seconds (keepalives, tcp_user_timeout), instead of writing into a dead connection for minutes.
CONNECT_DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "10",
                    "keepalives_interval": "3", "keepalives_count": "3", "tcp_user_timeout": "15000"}

DDL = """
CREATE TABLE IF NOT EXISTS certd_schema (
    id int PRIMARY KEY CHECK (id = 1),
    version int NOT NULL
);
-- One row per certificate, never deleted (a deleted row would restart its fencing tokens).
-- owner NULL: released. A row may be made with token 0 and no owner, never granted.
CREATE TABLE certd_leases (
    name text PRIMARY KEY,
    token bigint NOT NULL,
    owner text,
    expires timestamptz NOT NULL
);
CREATE TABLE certd_versions (
    name text NOT NULL,
    version int NOT NULL,
    cert bytea NOT NULL,
    chain bytea NOT NULL,
    key bytea NOT NULL,              -- sealed; '' once destroyed
    info jsonb NOT NULL,             -- the leaf's CertInfo (load_info reads no PEM)
    meta jsonb NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE certd_desired (
    name text PRIMARY KEY,
    version int NOT NULL
);
CREATE TABLE certd_applied (
    node text NOT NULL,
    name text NOT NULL,
    version int NOT NULL,
    PRIMARY KEY (node, name)
);
CREATE TABLE certd_rotations (
    node text NOT NULL,
    name text NOT NULL,
    journal jsonb NOT NULL,
    PRIMARY KEY (node, name)
);
CREATE TABLE certd_orders (
    name text PRIMARY KEY,
    url text NOT NULL,
    key bytea NOT NULL,              -- sealed
    created text NOT NULL,
    meta jsonb NOT NULL
);
CREATE TABLE certd_state (
    name text PRIMARY KEY,
    body jsonb NOT NULL,
    etag bigint NOT NULL             -- generation counter: the compare-and-set etag
);
-- changed: bumped by every fenced write of the certificate (change_token)
CREATE TABLE certd_changes (
    name text PRIMARY KEY,
    changed bigint NOT NULL
);
CREATE TABLE certd_accounts (
    directory text PRIMARY KEY,
    key bytea NOT NULL,              -- sealed
    registration text NOT NULL
);
-- account registration locks: leases too (a session advisory lock breaks behind a pooler)
CREATE TABLE certd_account_leases (
    name text PRIMARY KEY,
    token bigint NOT NULL,
    owner text,
    expires timestamptz NOT NULL
);
-- The audit log: one row per record, ``line`` exactly as certd.ops.audit writes a line of
-- audit.jsonl, chained the same way; certd_audit_head (one row) serialises appenders.
CREATE TABLE certd_audit (
    seq bigint PRIMARY KEY,
    line text NOT NULL
);
CREATE TABLE certd_audit_head (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    prev text NOT NULL               -- line_hash of the last line; 64 zeros before the first
);
INSERT INTO certd_audit_head VALUES (1, 0, repeat('0', 64));
"""

#: Upgrades, by the version they lead to: each runs in the transaction that records it, under
#: the schema lock, so nodes upgraded one by one and started at once apply it once.
UPGRADES: dict[int, str] = {
    2: """
-- The fleet's nodes: who is there and when each was last heard from (certd nodes).
CREATE TABLE certd_nodes (
    node text PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    software text NOT NULL,          -- certd's version on that node
    removed boolean NOT NULL DEFAULT false
);
-- What each node's endpoints were last seen serving, per certificate (status --fleet).
CREATE TABLE certd_node_reports (
    node text NOT NULL,
    name text NOT NULL,
    fingerprint_sha256 text,
    verified_at timestamptz,
    last_error text,
    updated timestamptz NOT NULL,
    PRIMARY KEY (node, name)
);
-- http-01 answers every node serves, whichever node ordered (no private data: a key
-- authorization is public by design, RFC 8555 §8.1).
CREATE TABLE certd_challenges (
    token text PRIMARY KEY,
    key_authorization text NOT NULL,
    name text NOT NULL,
    expires timestamptz NOT NULL
);
""",
    3: """
-- The audit spool's id of each record (certd.store.auditspool), given before the record's first
-- try: a record whose COMMIT reply was lost, spooled and replayed, is not chained twice. NULL for
-- records that never had one (unique: NULLs are distinct).
ALTER TABLE certd_audit ADD COLUMN spool_id text;
-- Records replayed by version 2 kept their spool id in the line only (detail.spool_id).
UPDATE certd_audit a SET spool_id = s.id FROM (
    SELECT DISTINCT ON (id) seq, id FROM (
        SELECT seq, substring(line FROM '"spool_id": "([^"]+)"') AS id FROM certd_audit
        WHERE line LIKE '%"spool_id": %') x
    WHERE id IS NOT NULL ORDER BY id, seq) s
WHERE a.seq = s.seq;
CREATE UNIQUE INDEX certd_audit_spool_id ON certd_audit (spool_id);
""",
    4: """
-- Fleet releases (certd/core/release.py, certd/store/pgrelease.py): the latest release of each
-- certificate (body: Release.to_json), each node's outcome of deploying a release's version,
-- and operator holds (a hold applies to the release in flight, or to the next one).
CREATE TABLE certd_releases (
    name text PRIMARY KEY,
    body jsonb NOT NULL
);
CREATE TABLE certd_release_reports (
    name text NOT NULL,
    version int NOT NULL,
    node text NOT NULL,
    ok boolean NOT NULL,
    error text,
    at timestamptz NOT NULL,
    PRIMARY KEY (name, version, node)
);
CREATE TABLE certd_release_holds (
    name text PRIMARY KEY,
    initiator text NOT NULL,
    at timestamptz NOT NULL
);
""",
    5: """
-- Whether each node can prove a certificate by handshake (its configuration has verify endpoints
-- for it), as the node last said: canaries picked by count skip the nodes that cannot.
CREATE TABLE certd_node_verifies (
    node text NOT NULL,
    name text NOT NULL,
    verifies boolean NOT NULL,
    PRIMARY KEY (node, name)
);
""",
    6: """
-- keyCompromise across a fleet (certd/store/pgcompromise.py): each node's record of destroying
-- its own copies of a compromised key (the key is named by its SPKI SHA-256, never stored), and
-- the fleet-wide completion, claimed once (its audit record is chained in the same transaction).
CREATE TABLE certd_key_destructions (
    name text NOT NULL,
    spki_sha256 text NOT NULL,
    node text NOT NULL,
    at timestamptz NOT NULL,
    files int NOT NULL,              -- copies removed on that node (0: none left there)
    PRIMARY KEY (name, spki_sha256, node)
);
CREATE TABLE certd_key_compromise_done (
    name text NOT NULL,
    spki_sha256 text NOT NULL,
    at timestamptz NOT NULL,
    by_node text NOT NULL,           -- the node whose pass saw it complete
    nodes jsonb NOT NULL,            -- the live nodes that had destroyed it then
    PRIMARY KEY (name, spki_sha256)
);
""",
}


def ensure_schema(conn: Any) -> None:
    """Create the schema if this database has none; refuse one newer than this certd's.
    ``conn``: a psycopg connection outside a transaction; commits."""
    with conn.transaction():
        row = conn.execute("SELECT to_regclass('certd_schema') IS NOT NULL").fetchone()
        if row[0]:
            found = conn.execute("SELECT version FROM certd_schema WHERE id = 1").fetchone()
            if found is not None and found[0] == VERSION:
                return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS certd_schema (id int PRIMARY KEY CHECK (id = 1), "
                     "version int NOT NULL)")
        found = conn.execute("SELECT version FROM certd_schema WHERE id = 1").fetchone()
        if found is None:
            conn.execute(DDL)
            conn.execute("INSERT INTO certd_schema VALUES (1, 1)")
            found = (1,)
        if found[0] > VERSION:
            raise StoreError(f"the database's certd schema is version {found[0]}, newer than this certd's "
                             f"({VERSION}): this node refuses to write to it; upgrade certd on this node")
        for version in range(found[0] + 1, VERSION + 1):
            conn.execute(UPGRADES[version])
            conn.execute("UPDATE certd_schema SET version = %s WHERE id = 1", (version,))


def conninfo(dsn: str, node: str) -> str:
    """``dsn`` with :data:`CONNECT_DEFAULTS` and an application name naming the node, where it
    does not set them itself."""
    given = conninfo_to_dict(dsn)
    extra: dict[str, Any] = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
    if "application_name" not in given:
        extra["application_name"] = f"certd {node}"[:63]
    return make_conninfo(dsn, **extra)


def configure(conn: psycopg.Connection[Any]) -> None:
    """Every pooled connection reads timestamps in UTC."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()
