"""The store seam on PostgreSQL (:class:`PgStore`): what a fleet of certd nodes shares.

Tables: :mod:`certd.store.pgschema`. How each contract of :mod:`certd.store.port` is kept:

- Lease grant: one ``INSERT ... ON CONFLICT (name) DO UPDATE SET token = token + 1 ... WHERE
  owner IS NULL OR expires <= now RETURNING``; two concurrent grants cannot both win. Lease rows
  are never deleted, so a token never repeats.
- Fenced write: the lease row is locked ``FOR SHARE`` in the write's own transaction and its
  token compared there; a concurrent grant (an UPDATE of that row) waits for the write to commit.
- Expiry: by the database's clock (``clock_timestamp()``); a test's fake clock is passed as the
  "now" parameter instead (any clock but :class:`~certd.core.clock.SystemClock`).
- State: compare-and-set on a generation counter (``etag``).
- Private keys are stored sealed by the ``[keys]`` KeyRing (slots as FileStore's:
  ``version/<name>/<n>``, ``order/<name>``, ``account/<id>``), never in plain text: without a
  keyring a key is refused.

Connections come from a small pool (autocommit off, one explicit transaction per operation);
a subscription holds one more of its own for LISTEN (:mod:`certd.store.pgfeed`). An operation
waits at most :data:`POOL_WAIT` seconds for a connection (psycopg_pool's default is 30): while
the database is down every operation fails that fast, with a :class:`StoreError` saying
"database unreachable", instead of holding a worker (or an operator's command) for half a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from certd.core.clock import Clock, SystemClock
from certd.core.errors import LockBusy, StoreError, StoreUnreachable
from certd.core.model import Bundle, CertInfo
from certd.crypto.custody import KeyRing
from certd.ops.log import event
from certd.store.pgfeed import PgAudit, PgSubscription
from certd.store.pgfleet import FleetBook
from certd.store import pglease
from certd.store.pglease import FleetLock
from certd.store.pgcompromise import UNFINISHED, CompromiseBook
from certd.store.pgrelease import ReleaseBook, desired_refusal
from certd.store.pgschema import configure, conninfo, ensure_schema
from certd.store.port import LEGACY_TTL, Conflict, Fenced, Lease, LeaseLost, OrderJournal, StoredVersion, VersionInfo

log = logging.getLogger("certd.store")

_POLL = 0.05  # seconds between tries of a busy lease
#: a wait for a pooled connection this long (real seconds) is logged (``store_pool_wait``) with
#: what held the pool's connections then: the evidence for sizing the pool (issue 17's soak)
POOL_WAIT_LOG = 0.5
#: seconds an operation waits for a pooled connection: about libpq's ``connect_timeout`` (a new
#: connection to a database that answers takes far less; operations are short transactions)
POOL_WAIT = 5.0
ACCOUNT_LOCK_TTL = 600.0  # a registration lock outlives a dead holder by at most this
#: seconds psycopg_pool keeps retrying one lost connection before giving up; the next request
#: starts a fresh attempt at once. Its backoff doubles from 1 s with no cap (1, 2, 4, ... 32, 64 s),
#: so with the default 300 s a database back after a 30 s outage waited up to 31 s for the pool's
#: next try (every store operation blocked meanwhile); 10 s keeps the gap under 4 s.
RECONNECT_TIMEOUT = 10.0
NOW = "COALESCE(%(now)s::timestamptz, clock_timestamp())"
#: the lease proof (FleetLock.check) and the order journal's write (save_order, fenced) in one
#: statement: nothing is written unless the lease is still this holder's
_PROVE_WITH_ORDER = (
    f"WITH proof AS (UPDATE certd_leases SET expires = {NOW} + make_interval(secs => %(ttl)s) "
    "WHERE name = %(name)s AND token = %(token)s AND owner IS NOT NULL RETURNING expires), "
    "changed AS (INSERT INTO certd_changes SELECT %(name)s::text, 1 FROM proof ON CONFLICT (name) DO UPDATE "
    "SET changed = certd_changes.changed + 1), "
    "journal AS (INSERT INTO certd_orders SELECT %(name)s::text, %(url)s::text, %(key)s::bytea, %(created)s::text, "
    "%(meta)s::jsonb FROM proof ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, key = EXCLUDED.key, "
    "created = EXCLUDED.created, meta = EXCLUDED.meta) "
    "SELECT expires FROM proof")
_GRANT = """
    INSERT INTO {table} AS l (name, token, owner, expires)
    VALUES (%(name)s, 1, %(owner)s, {now} + make_interval(secs => %(ttl)s))
    ON CONFLICT (name) DO UPDATE SET token = l.token + 1, owner = EXCLUDED.owner, expires = EXCLUDED.expires
    WHERE l.owner IS NULL OR l.expires <= {now}
    RETURNING token, expires"""


def _kind(thread_name: str) -> str:
    """A thread's kind, from its name: ``certd-apply_3`` -> ``certd-apply``, ``certd-lease-f001``
    -> ``certd-lease``."""
    if thread_name.startswith("certd-lease-"):
        return "certd-lease"
    return re.sub(r"[_-]?\d+(?:_\d+)?$", "", thread_name.split(" ")[0]) or thread_name


def account_id(directory_url: str) -> str:
    """The account's id, as FileStore names its directory (the sealing slot ``account/<id>``)."""
    return hashlib.sha256(directory_url.encode()).hexdigest()[:16]


def _no_key_material(obj: Any, what: str) -> None:
    if b"PRIVATE KEY" in json.dumps(obj, default=str).encode():
        raise ValueError(f"{what} must not contain key material")


class PgStore:
    """:class:`~certd.store.port.StorePort` (and the single-host Store) on a PostgreSQL database."""

    def __init__(self, dsn: str, *, node: str, clock: Clock | None = None, keyring: KeyRing | None = None,
                 pool_size: int = 4, lease_ttl: float = LEGACY_TTL) -> None:
        self.node = node
        self._clock: Clock = clock or SystemClock()
        self._fake_now = clock is not None and not isinstance(clock, SystemClock)
        self._ring = keyring
        self._bound: dict[str, Lease] = {}
        #: lock(): ``lease_ttl`` kept alive while held (a fleet passes pglease.fleet_ttl)
        self.locks = FleetLock(self, self._bound, node, lease_ttl, self._clock)
        self.fleet = FleetBook(self)  # nodes, their reports, the shared http-01 answers
        self.releases = ReleaseBook(self)  # canary releases and the versions marked bad
        self.compromises = CompromiseBook(self)  # keyCompromise: each node's destruction, the completion
        self._pool: ConnectionPool | None = None
        self._holders: dict[int, str] = {}  # thread id -> its name's kind, while it holds a connection
        self._holders_lock = threading.Lock()
        try:
            self.dsn = conninfo(dsn, node)
            # One direct connection first: a wrong password or an unreachable host fails now with
            # the server's own words, where the pool would retry for 30 s and say only "timeout".
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                ensure_schema(conn)
            # check: a connection the server dropped (a restart, an outage) is replaced before it is
            # handed out, instead of failing the first operation after the database is back.
            self._pool = ConnectionPool(self.dsn, min_size=1, max_size=pool_size, open=True, configure=configure,
                                        check=ConnectionPool.check_connection, timeout=POOL_WAIT,
                                        reconnect_timeout=RECONNECT_TIMEOUT,
                                        kwargs={"autocommit": False}, name=f"certd-{node}")
        except BaseException as e:
            self.close()  # no pool threads left behind
            if isinstance(e, psycopg.Error):
                raise StoreError(f"PostgreSQL store: {e}") from e
            raise

    def close(self) -> None:
        """Close the pooled connections (a subscription closes its own)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def now_param(self) -> datetime | None:
        """The injected clock's "now" for a query, or None: the database's clock."""
        return self._clock.now() if self._fake_now else None

    @property
    def clock(self) -> Clock:
        return self._clock

    @contextmanager
    def tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on a pooled connection: committed when the block ends, rolled back
        when it raises. Database errors become :class:`StoreError`."""
        try:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except PoolTimeout as e:
            raise StoreUnreachable(f"PostgreSQL store: database unreachable: no connection within {POOL_WAIT:g} s "
                                   f"({e})") from e
        except psycopg.OperationalError as e:
            if e.sqlstate is None:  # no answer from the server: the connection failed or was lost
                raise StoreUnreachable(f"PostgreSQL store: database unreachable: {' '.join(str(e).split())}") from e
            raise StoreError(f"PostgreSQL store: {e}") from e
        except psycopg.Error as e:
            raise StoreError(f"PostgreSQL store: {e}") from e

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block; a long wait for it is logged with who held the
        pool's connections meanwhile (by thread kind: applies, renewals, lease keepers...)."""
        pool = self._pool
        if pool is None:
            raise StoreError("PostgreSQL store: closed")
        started = time.monotonic()
        try:
            with pool.connection() as conn:
                waited = time.monotonic() - started
                if waited >= POOL_WAIT_LOG:
                    self._said_wait(pool, waited, "connection")
                me = threading.get_ident()
                with self._holders_lock:
                    self._holders[me] = _kind(threading.current_thread().name)
                try:
                    yield conn
                finally:
                    with self._holders_lock:
                        self._holders.pop(me, None)
        except PoolTimeout:
            self._said_wait(pool, time.monotonic() - started, "timeout")
            raise

    def _said_wait(self, pool: ConnectionPool, waited: float, outcome: str) -> None:
        stats = pool.get_stats()
        with self._holders_lock:
            kinds: dict[str, int] = {}
            for kind in self._holders.values():
                kinds[kind] = kinds.get(kind, 0) + 1
        event(log, "store_pool_wait", logging.WARNING, waited=round(waited, 2), outcome=outcome,
              thread=_kind(threading.current_thread().name), size=stats.get("pool_size"),
              max=stats.get("pool_max"), available=stats.get("pool_available"),
              waiting=stats.get("requests_waiting"),
              holders=",".join(f"{k}:{n}" for k, n in sorted(kinds.items())) or "none")

    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None:
        with self.tx() as cur:
            return cur.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
        with self.tx() as cur:
            return cur.execute(sql, args).fetchall()

    def _fence(self, cur: psycopg.Cursor[Any], name: str, lease: Lease | None) -> None:
        """Lock the lease row for the rest of this transaction and refuse a stale token; then
        count the certificate as changed (:meth:`change_token`)."""
        lease = lease or self._bound.get(name)
        if lease is not None:
            row = cur.execute("SELECT token FROM certd_leases WHERE name = %s FOR SHARE", (name,)).fetchone()
            if row is None or row[0] != lease.token:
                raise Fenced(f"{name}: write refused: lease token {lease.token} is stale "
                             f"(token {row[0] if row else None})")
        cur.execute("INSERT INTO certd_changes VALUES (%s, 1) ON CONFLICT (name) DO UPDATE "
                    "SET changed = certd_changes.changed + 1", (name,))

    def _seal(self, key_pem: bytes, slot: str) -> bytes:
        if self._ring is None:
            raise StoreError(f"{slot}: refusing to store a private key in plain text: a shared database needs "
                             f"[keys] (a KEK every node has)")
        return self._ring.seal(key_pem, slot)

    def _open(self, data: bytes, slot: str) -> bytes:
        if not data:
            return b""
        if self._ring is None:
            raise StoreError(f"{slot}: the key is sealed; configure [keys] with the KEK the fleet uses")
        return self._ring.open(data, slot, where=f"sealed key {slot} in the database")

    # -- leases ------------------------------------------------------------------------------

    def _grant(self, table: str, name: str, owner: str, ttl: float, wait: float, busy: str) -> Lease:
        deadline = self._clock.monotonic() + wait
        sql = _GRANT.format(table=table, now=NOW)
        while True:
            row = self._one(sql, {"name": name, "owner": owner, "ttl": ttl, "now": self.now_param()})
            if row is not None:
                return Lease(name, owner, int(row[0]), row[1])
            left = deadline - self._clock.monotonic()
            if left <= 0:
                raise LockBusy(busy)
            self._clock.sleep(min(_POLL, left))

    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease:
        return self._grant("certd_leases", name, owner, ttl, wait,
                           f"{name}: another owner holds the lease; try again when it has finished")

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        row = self._one(f"UPDATE certd_leases SET expires = {NOW} + make_interval(secs => %(ttl)s) "
                        "WHERE name = %(name)s AND token = %(token)s AND owner IS NOT NULL RETURNING expires",
                        {"ttl": LEGACY_TTL if ttl is None else ttl, "name": lease.name, "token": lease.token,
                         "now": self.now_param()})
        if row is None:
            raise LeaseLost(f"{lease.name}: lease {lease.token} was lost (released or taken over)")
        return Lease(lease.name, lease.owner, lease.token, row[0])

    def release(self, lease: Lease) -> None:
        self._one("UPDATE certd_leases SET owner = NULL WHERE name = %s AND token = %s RETURNING token",
                  (lease.name, lease.token))

    def reclaim_dead_leases(self) -> list[str]:
        """Release the leases a previous process of this node on this host still holds: it died
        (SIGKILL, a crash), so nothing it sent can still be on its way, and waiting out the TTL
        would only keep this node's restart from its work. Leases of other hosts, of live
        processes and of this process are kept. The names released."""
        prefix = pglease.owner_prefix(self.node)
        rows = self._all("SELECT name, token, owner FROM certd_leases WHERE owner IS NOT NULL "
                         "AND left(owner, %s) = %s", (len(prefix), prefix))
        released = []
        for name, token, owner in rows:
            if pglease.dead_owner(owner, prefix) and self._one(
                    "UPDATE certd_leases SET owner = NULL WHERE name = %s AND token = %s AND owner = %s "
                    "RETURNING token", (name, token, owner)) is not None:
                released.append(name)
        return released

    def check(self, lease: Lease) -> None:
        row = self._one(f"SELECT token, owner IS NOT NULL, expires > {NOW} FROM certd_leases WHERE name = %(name)s",
                        {"name": lease.name, "now": self.now_param()})
        if row is None or row[0] != lease.token or not row[1]:
            raise LeaseLost(f"{lease.name}: lease {lease.token} was taken over or released")
        if not row[2]:
            raise LeaseLost(f"{lease.name}: lease {lease.token} expired")

    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]:
        """The certificate's lease for the block, kept alive while held (:mod:`certd.store.pglease`)."""
        return self.locks.held(name, timeout)

    def check_lock(self, name: str) -> None:
        """Prove (and extend) the lease ``lock()`` holds on ``name``: LeaseLost if taken over."""
        self.locks.check(name)

    # -- versions ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [r[0] for r in self._all("SELECT name FROM certd_versions UNION SELECT name FROM certd_state "
                                        "UNION SELECT name FROM certd_desired ORDER BY 1")]

    def versions(self, name: str) -> list[int]:
        return [r[0] for r in self._all("SELECT version FROM certd_versions WHERE name = %s ORDER BY 1", (name,))]

    def load(self, name: str, version: int) -> StoredVersion:
        row = self._one("SELECT cert, chain, key, info, meta FROM certd_versions WHERE name = %s AND version = %s",
                        (name, version))
        if row is None:
            raise StoreError(f"{name}: version {version} is not in the store")
        cert, chain, key, info, meta = row
        bundle = Bundle(bytes(cert), bytes(chain), self._open(bytes(key), f"version/{name}/{version}"))
        return StoredVersion(name, version, bundle.with_info(CertInfo.from_json(info)), meta)

    def load_info(self, name: str, version: int) -> VersionInfo:
        row = self._one("SELECT info, meta FROM certd_versions WHERE name = %s AND version = %s", (name, version))
        if row is None:
            raise StoreError(f"{name}: version {version} is not in the store")
        return VersionInfo(name, version, CertInfo.from_json(row[0]), row[1])

    def add_version(self, name: str, bundle: Bundle, meta: dict[str, Any], *, lease: Lease | None = None) -> int:
        if not bundle.cert_pem or not bundle.key_pem:
            raise ValueError("a stored version needs a certificate and its private key")
        _no_key_material(meta, "version metadata")
        info = Jsonb(bundle.info.to_json())
        with self.tx() as cur:
            self._fence(cur, name, lease)
            row = cur.execute("SELECT COALESCE(max(version), 0) + 1 FROM certd_versions WHERE name = %s",
                              (name,)).fetchone()
            version = int(row[0]) if row else 1
            key = self._seal(bundle.key_pem, f"version/{name}/{version}")
            cur.execute("INSERT INTO certd_versions (name, version, cert, chain, key, info, meta) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (name, version, bundle.cert_pem, bundle.chain_pem, key, info, Jsonb(meta)))
            return version

    def update_meta(self, name: str, version: int, changes: dict[str, Any], *, lease: Lease | None = None) -> None:
        _no_key_material(changes, "version metadata")
        with self.tx() as cur:
            self._fence(cur, name, lease)
            cur.execute("UPDATE certd_versions SET meta = meta || %s WHERE name = %s AND version = %s",
                        (Jsonb(changes), name, version))
            if cur.rowcount == 0:
                raise StoreError(f"{name}: version {version} is not in the store")

    def prune(self, name: str, keep: int, protect: Collection[int] = (), *, lease: Lease | None = None) -> list[int]:
        if keep < 0:
            raise ValueError("keep must be >= 0")
        with self.tx() as cur:
            self._fence(cur, name, lease)
            versions = [r[0] for r in cur.execute("SELECT version FROM certd_versions WHERE name = %s ORDER BY 1",
                                                  (name,)).fetchall()]
            desired = cur.execute("SELECT version FROM certd_desired WHERE name = %s", (name,)).fetchone()
            unfinished = cur.execute(f"SELECT v.version FROM certd_versions v WHERE v.name = %s AND {UNFINISHED}",
                                     (name,)).fetchall()  # a compromised key some node may still hold
            spare = {desired[0] if desired else None, *protect, *(r[0] for r in unfinished)}
            removed = [v for v in versions if v not in spare][:max(0, len(versions) - keep)]
            cur.execute("DELETE FROM certd_versions WHERE name = %s AND version = ANY(%s)", (name, removed))
            return removed

    def destroy_key(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        with self.tx() as cur:
            self._fence(cur, name, lease)
            cur.execute("UPDATE certd_versions SET key = '', meta = meta || '{\"key_destroyed\": true}' "
                        "WHERE name = %s AND version = %s", (name, version))
            if cur.rowcount == 0:
                raise StoreError(f"{name}: version {version} is not in the store")

    # -- desired and applied -----------------------------------------------------------------

    def desired(self, name: str) -> int | None:
        row = self._one("SELECT version FROM certd_desired WHERE name = %s", (name,))
        return row[0] if row else None

    current = desired

    def set_desired(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        with self.tx() as cur:
            self._fence(cur, name, lease)
            self._set_desired(cur, name, version)

    @staticmethod
    def _set_desired(cur: psycopg.Cursor[Any], name: str, version: int) -> None:
        """Make ``version`` desired in the caller's (fenced) transaction, unless S3 forbids it."""
        row = cur.execute("SELECT length(key) FROM certd_versions WHERE name = %s AND version = %s",
                          (name, version)).fetchone()
        if row is None:
            raise StoreError(f"{name}: cannot make version {version} current: it is not in the store")
        if row[0] == 0:
            raise StoreError(f"{name}: cannot make version {version} current: its private key was destroyed")
        refusal = desired_refusal(cur, name, version)  # S3: a bad or unpromoted version never spreads
        if refusal is not None:
            raise StoreError(refusal)
        cur.execute("INSERT INTO certd_desired VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                    "SET version = EXCLUDED.version", (name, version))
        cur.execute("SELECT pg_notify('certd_desired', %s)", (name,))  # a wake-up, delivered at commit

    def applied(self, node: str, name: str) -> int | None:
        row = self._one("SELECT version FROM certd_applied WHERE node = %s AND name = %s", (node, name))
        return row[0] if row else None

    def set_applied(self, node: str, name: str, version: int | None) -> None:
        if version is None:
            self._one("DELETE FROM certd_applied WHERE node = %s AND name = %s RETURNING version", (node, name))
        else:
            self._one("INSERT INTO certd_applied VALUES (%s, %s, %s) ON CONFLICT (node, name) DO UPDATE "
                      "SET version = EXCLUDED.version RETURNING version", (node, name, version))

    def set_current(self, name: str, version: int) -> None:
        self.set_desired(name, version)
        self.set_applied(self.node, name, version)

    # -- journals ----------------------------------------------------------------------------

    def load_rotation(self, node: str, name: str) -> dict[str, Any] | None:
        row = self._one("SELECT journal FROM certd_rotations WHERE node = %s AND name = %s", (node, name))
        return row[0] if row else None

    def save_rotation(self, node: str, name: str, journal: dict[str, Any] | None, *,
                      lease: Lease | None = None) -> None:
        with self.tx() as cur:
            self._fence(cur, name, lease)
            if journal is None:
                cur.execute("DELETE FROM certd_rotations WHERE node = %s AND name = %s", (node, name))
            else:
                cur.execute("INSERT INTO certd_rotations VALUES (%s, %s, %s) ON CONFLICT (node, name) DO UPDATE "
                            "SET journal = EXCLUDED.journal", (node, name, Jsonb(journal)))

    def foreign_rotations(self, name: str) -> dict[str, dict[str, Any]]:
        """The rotation journals other nodes keep for ``name`` (finished or not), by node."""
        rows = self._all("SELECT node, journal FROM certd_rotations WHERE name = %s AND node <> %s", (name, self.node))
        return {r[0]: r[1] for r in rows}

    def drop_rotation(self, node: str, name: str) -> None:
        """Forget ``node``'s rotation of ``name`` and what it applied, in one fenced transaction:
        its reconciler then re-applies the desired version, whatever the rotation left on disk."""
        with self.tx() as cur:
            self._fence(cur, name, None)
            cur.execute("DELETE FROM certd_rotations WHERE node = %s AND name = %s", (node, name))
            cur.execute("DELETE FROM certd_applied WHERE node = %s AND name = %s", (node, name))

    def load_journal(self, name: str) -> dict[str, Any] | None:
        return self.load_rotation(self.node, name)

    def save_journal(self, name: str, journal: dict[str, Any] | None) -> None:
        self.save_rotation(self.node, name, journal)

    def load_order(self, name: str) -> OrderJournal | None:
        row = self._one("SELECT url, key, created, meta FROM certd_orders WHERE name = %s", (name,))
        if row is None:
            return None
        return OrderJournal(row[0], self._open(bytes(row[1]), f"order/{name}"), row[2], dict(row[3]))

    def save_order(self, name: str, order: OrderJournal | None, *, lease: Lease | None = None) -> None:
        if order is not None:
            _no_key_material(order.meta, "order metadata")
        with self.tx() as cur:
            self._fence(cur, name, lease)
            if order is None:
                cur.execute("DELETE FROM certd_orders WHERE name = %s", (name,))
                return
            key = self._seal(order.key_pem, f"order/{name}")
            cur.execute("INSERT INTO certd_orders VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE "
                        "SET url = EXCLUDED.url, key = EXCLUDED.key, created = EXCLUDED.created, meta = EXCLUDED.meta",
                        (name, order.order_url, key, order.created, Jsonb(order.meta)))

    def prove_with_order(self, name: str, order: OrderJournal) -> None:
        """Prove and extend the lease ``lock()`` holds on ``name`` (as :meth:`check_lock`) and
        journal ``order`` (as :meth:`save_order`) in one statement: the renewal's order intent
        right before newOrder costs no round trip beyond the lease proof it replaces. Without a
        held lease, :meth:`save_order` alone. LeaseLost when another node holds the lease."""
        lease = self._bound.get(name)
        if lease is None:
            self.save_order(name, order)
            return
        _no_key_material(order.meta, "order metadata")
        row = self._one(_PROVE_WITH_ORDER, {
            "ttl": self.locks.ttl, "name": name, "token": lease.token, "now": self.now_param(),
            "url": order.order_url, "key": self._seal(order.key_pem, f"order/{name}"), "created": order.created,
            "meta": Jsonb(order.meta)})
        if row is None:
            raise LeaseLost(f"{name}: lease {lease.token} was lost (released or taken over)")
        if self._bound.get(name) is lease:  # as FleetLock.check: the keeper extends from here
            self._bound[name] = Lease(lease.name, lease.owner, lease.token, row[0])

    # -- state (compare-and-set) -------------------------------------------------------------

    def read_state(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        row = self._one("SELECT body, etag FROM certd_state WHERE name = %s", (name,))
        return (row[0], str(row[1])) if row else (None, None)

    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str:
        with self.tx() as cur:
            self._fence(cur, name, lease)
            if expected is None:
                row = cur.execute("INSERT INTO certd_state VALUES (%s, %s, 1) ON CONFLICT DO NOTHING RETURNING etag",
                                  (name, Jsonb(state))).fetchone()
            else:
                try:
                    etag = int(expected)
                except ValueError:
                    raise Conflict(f"{name}: etag {expected!r} is not this store's") from None
                row = cur.execute("UPDATE certd_state SET body = %s, etag = etag + 1 WHERE name = %s AND etag = %s "
                                  "RETURNING etag", (Jsonb(state), name, etag)).fetchone()
            if row is None:
                raise Conflict(f"{name}: state changed since it was read (expected etag {expected})")
            return str(row[0])

    def load_state(self, name: str) -> dict[str, Any] | None:
        return self.read_state(name)[0]

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        with self.tx() as cur:
            self._fence(cur, name, None)
            cur.execute("INSERT INTO certd_state VALUES (%s, %s, 1) ON CONFLICT (name) DO UPDATE "
                        "SET body = EXCLUDED.body, etag = certd_state.etag + 1", (name, Jsonb(state)))

    def change_token(self, name: str) -> Hashable:
        row = self._one("SELECT changed FROM certd_changes WHERE name = %s", (name,))
        return row[0] if row else 0

    # -- change feed, audit, accounts --------------------------------------------------------

    def subscribe(self, names: Collection[str] | None = None, *, notified: bool = False) -> PgSubscription:
        """The desired versions' changes (``notified``: and every name notified, see pgfeed)."""
        return PgSubscription(self, names, notified)

    @property
    def audit(self) -> PgAudit:
        return PgAudit(self)

    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        row = self._one("SELECT key, registration FROM certd_accounts WHERE directory = %s", (directory_url,))
        if row is None:
            return None
        return self._open(bytes(row[0]), f"account/{account_id(directory_url)}"), row[1]

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        key = self._seal(key_pem, f"account/{account_id(directory_url)}")
        self._one("INSERT INTO certd_accounts VALUES (%s, %s, %s) ON CONFLICT (directory) DO UPDATE "
                  "SET key = EXCLUDED.key, registration = EXCLUDED.registration RETURNING directory",
                  (directory_url, key, registration_json))

    @contextmanager
    def account_lock(self, directory_url: str, timeout: float = 60.0) -> Iterator[None]:
        """Registration for ``directory_url`` by one client at a time: a lease row of its own
        (freed by a dead holder's expiry after :data:`ACCOUNT_LOCK_TTL`)."""
        lease = self._grant("certd_account_leases", directory_url, f"{self.node}:{threading.get_ident()}",
                            ACCOUNT_LOCK_TTL, timeout,
                            f"another client has been registering the ACME account for {directory_url}")
        try:
            yield
        finally:
            self._one("UPDATE certd_account_leases SET owner = NULL WHERE name = %s AND token = %s RETURNING token",
                      (directory_url, lease.token))

