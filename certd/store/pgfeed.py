"""The PostgreSQL store's change feed and audit log (used by :class:`certd.store.pg.PgStore`).

A subscription answers from a ``SELECT`` of the desired versions, but reads only what may have
changed: every idle node used to read the whole of ``certd_desired`` every second. ``LISTEN
certd_desired`` on a connection of its own hears every commit of a desired version (its
payload: the name; a notification is delivered at commit). While that connection is up the
subscription reads only the names notified, and everything only when the LISTEN (re)starts
(notifications to a disconnected listener are lost) and every :data:`_RESYNC` seconds, a
backstop for a writer that does not notify; the fleet's reconcile pass reads each certificate's
desired version on its own interval anyway. A subscription made with ``notified=True`` (the
fleet's pass) also answers a name notified whose desired version did not move — a release step
or a node's report on the release (certd/store/pgrelease.py notifies each) — with its unchanged
version: the releases' drivers and canaries look at once, not at their next interval.
Without the LISTEN connection it reads everything every :data:`_WAKE` seconds, as before. With a
fake clock it polls through the clock, so a test never waits in real time.

The audit log is ``certd_audit``: one row per record, each ``line`` exactly what
:class:`certd.ops.audit.AuditLog` would append to ``audit.jsonl`` (same fields, same ``seq``,
``prev`` and ``hash``), so :func:`certd.ops.auditchain.verify_lines` checks it. Appenders are
serialised by locking the one row of ``certd_audit_head`` (which also keeps ``seq`` and the last
line's hash) in the appending transaction: the chain never forks across nodes. A record may
carry a spool id (:mod:`certd.store.auditspool`), kept in ``certd_audit.spool_id`` under a
unique index: a record with an id already chained is skipped (``ON CONFLICT DO NOTHING``), so a
record whose first append committed unheard, spooled and replayed, is chained once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

import psycopg

from certd.core.clock import Clock
from certd.core.errors import StoreError
from certd.core.events import LifecycleEvent
from certd.ops.audit import record_fields, record_line
from certd.ops.auditchain import Verification, line_hash, parse_line, record_hash, verify_lines
from certd.ops.log import event as log_event
from certd.store.port import DesiredChange

log = logging.getLogger("certd.audit")
_POLL = 0.05
_WAKE = 1.0  # seconds between full reads while there is no LISTEN connection (real clock)
_RESYNC = 30.0  # seconds between full reads while LISTEN works (a backstop)
_RELISTEN = 10.0  # seconds between attempts to reconnect a lost LISTEN connection


class _Db(Protocol):
    dsn: str

    @property
    def clock(self) -> Clock: ...
    def now_param(self) -> datetime | None: ...
    def tx(self) -> AbstractContextManager[psycopg.Cursor[Any]]: ...


class PgSubscription:
    """:class:`~certd.store.port.Subscription` on ``certd_desired`` (module essay: when it reads)."""

    def __init__(self, store: _Db, names: Collection[str] | None, notified: bool = False) -> None:
        self._store = store
        self._names = None if names is None else set(names)
        self._every_notified = notified  # also a notified name whose desired version stayed
        self._closed = False
        self._fake = store.now_param() is not None  # a test's clock: poll through it, no LISTEN
        self._conn: psycopg.Connection[Any] | None = None
        self._listen_after = 0.0
        self._resync_at = 0.0
        self._notified: set[str] = set()  # names notified since the last read
        self._listen()  # before the first read: a commit after it is notified, one before it is read
        self._seen = self._look(None)
        self._resync_at = store.clock.monotonic() + _RESYNC

    def _listen(self) -> bool:
        """(Re)connect the LISTEN connection, at most every :data:`_RELISTEN` seconds; a failure
        leaves the feed polling (a full read every :data:`_WAKE` seconds). True: a new LISTEN
        began, so notifications may have been lost before it (the caller reads everything)."""
        clock = self._store.clock
        if self._fake or self._conn is not None or clock.monotonic() < self._listen_after:
            return False
        self._listen_after = clock.monotonic() + _RELISTEN
        try:
            self._conn = psycopg.connect(self._store.dsn, autocommit=True)
            self._conn.execute("LISTEN certd_desired")
        except psycopg.Error as e:
            log_event(log, "store_listen_failed", logging.WARNING, error=str(e))
            self._drop()
            return False
        return True

    def _look(self, names: Collection[str] | None) -> dict[str, int | None]:
        """The desired versions of ``names`` (None: of every name subscribed to)."""
        wanted = self._names if names is None else set(names)
        with self._store.tx() as cur:
            if wanted is None:
                rows = cur.execute("SELECT name, version FROM certd_desired").fetchall()
            else:
                rows = cur.execute("SELECT name, version FROM certd_desired WHERE name = ANY(%s)",
                                   (sorted(wanted),)).fetchall()
        return {n: v for n, v in rows if self._names is None or n in self._names}

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def _drain(self, timeout: float) -> None:
        """Collect notifications (their payload: a name) for up to ``timeout`` real seconds, or
        until the first arrives."""
        if self._conn is None:
            return
        try:
            for n in self._conn.notifies(timeout=timeout, stop_after=1):
                self._notified.add(n.payload)
            for n in self._conn.notifies(timeout=0, stop_after=1000):
                self._notified.add(n.payload)
        except psycopg.Error:
            self._drop()  # polling until _listen() reconnects

    def _poll(self) -> list[DesiredChange]:
        """What changed since the last call, reading no more than may have: everything while
        polling (no LISTEN), after a new LISTEN and every :data:`_RESYNC` seconds; otherwise the
        names notified, and nothing at all when none was."""
        clock = self._store.clock
        fresh = self._listen()
        self._drain(0)
        notified, self._notified = self._notified, set()
        if self._conn is None or fresh or clock.monotonic() >= self._resync_at:
            self._resync_at = clock.monotonic() + _RESYNC
            now, gone = self._look(None), set(self._seen)
            seen = dict(now)
        else:
            wanted = notified if self._names is None else notified & self._names
            if not wanted:
                return []
            now, gone = self._look(wanted), wanted
            seen = {**self._seen, **now}
        gone = (gone & set(self._seen)) - set(now)
        for name in gone:
            seen.pop(name, None)
        found = [DesiredChange(n, v) for n, v in sorted(now.items())
                 if self._seen.get(n) != v or (self._every_notified and n in notified)]
        found += [DesiredChange(n, None) for n in sorted(gone)]
        self._seen = seen
        return found

    def changes(self, timeout: float = 0.0) -> list[DesiredChange]:
        clock = self._store.clock
        deadline = clock.monotonic() + timeout
        while not self._closed:
            found = self._poll()
            left = deadline - clock.monotonic()
            if found or left <= 0:
                return found
            if self._conn is None:
                clock.sleep(min(_POLL if self._fake else _WAKE, left))
            else:
                self._drain(min(_WAKE, left))
        return []

    def close(self) -> None:
        self._closed = True
        self._drop()


class PgAudit:
    """:class:`~certd.store.port.AuditSink` appending to ``certd_audit``, hash-chained."""

    def __init__(self, store: _Db) -> None:
        self._store = store

    def __call__(self, ev: LifecycleEvent) -> None:
        self.append(ev)

    def append(self, ev: LifecycleEvent, spool_id: str | None = None) -> dict[str, Any] | None:
        """Chain ``ev``; None when ``spool_id`` is already in the chain (nothing appended)."""
        fields = record_fields(ev)  # AuditRefused if it would hold key material
        with self._store.tx() as cur:
            record = _chain(cur, fields, spool_id)
        if record is not None:
            log_event(log, "audit_record", seq=record["seq"], hash=record["hash"])
        return record

    def append_spooled(self, records: list[tuple[str, dict[str, Any]]]) -> int:
        """Chain ``records`` (spool id, complete fields) in order, in one transaction, skipping
        those whose spool id is already chained: a record whose first append committed unheard,
        or a replay repeated after a crash, appends nothing twice (:mod:`certd.store.auditspool`).
        Returns how many were appended."""
        chained = []
        with self._store.tx() as cur:
            for spool_id, fields in records:
                record = _chain(cur, fields, spool_id)
                if record is not None:
                    chained.append(record)
        for record in chained:
            log_event(log, "audit_record", seq=record["seq"], hash=record["hash"], spooled=True)
        return len(chained)

    def lines(self) -> list[bytes]:
        with self._store.tx() as cur:
            return [r[0].encode() for r in cur.execute("SELECT line FROM certd_audit ORDER BY seq")]

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for r in (parse_line(line) for line in self.lines()) if r is not None]

    def verify(self, expect_head: str | None = None) -> Verification:
        """The chain checked as ``certd audit verify`` checks audit.jsonl (``expect_head``: a
        record hash exported earlier, from the ``audit_record`` log lines)."""
        lines = self.lines()
        raw = b"".join(line + b"\n" for line in lines) if lines else None
        return verify_lines("certd_audit", raw, None, False, expect_head)


def append_in(cur: psycopg.Cursor[Any], ev: LifecycleEvent, spool_id: str) -> dict[str, Any] | None:
    """Chain ``ev`` in ``cur``'s transaction (with what else that transaction writes, so both or
    neither happen), once: None when ``spool_id`` is already chained."""
    return _chain(cur, record_fields(ev), spool_id)


def _chain(cur: psycopg.Cursor[Any], fields: dict[str, Any], spool_id: str | None) -> dict[str, Any] | None:
    """Append one record after the chain's head, in ``cur``'s transaction (the head row locked);
    None, and the head untouched, when ``spool_id`` is already chained."""
    head = cur.execute("SELECT seq, prev FROM certd_audit_head WHERE id = 1 FOR UPDATE").fetchone()
    if head is None:
        raise StoreError("certd_audit_head has no row: the audit table was tampered with")
    record = {"seq": head[0] + 1, **fields, "prev": head[1]}
    record["hash"] = record_hash(record)
    line = record_line(record)
    if cur.execute("INSERT INTO certd_audit (seq, line, spool_id) VALUES (%s, %s, %s) "
                   "ON CONFLICT (spool_id) DO NOTHING RETURNING seq",
                   (record["seq"], line.decode(), spool_id)).fetchone() is None:
        return None
    cur.execute("UPDATE certd_audit_head SET seq = %s, prev = %s WHERE id = 1", (record["seq"], line_hash(line)))
    return record
