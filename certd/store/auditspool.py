"""A fleet node's audit records while the database is down: spooled locally, replayed once.

The fleet's audit log is the database's hash chain (:class:`certd.store.pgfeed.PgAudit`). A
record emitted while the database is unreachable must not be lost (docs/FLEET.md S5), so
:class:`SpoolingAudit` wraps that sink:

- Every record gets a spool id unique to it (``<node>:<uuid>``) *before* its first try, and the
  database keeps it with the chained row (``certd_audit.spool_id``, unique).
- A record the database does not take (:class:`~certd.core.errors.StoreError`) is appended to
  ``<state_dir>/audit.spool.jsonl`` (created 0600; one ``write`` and an ``fsync`` per record, under
  an exclusive ``flock``, as :class:`certd.ops.audit.AuditLog` appends): the record's fields,
  complete (node and initiator included: the node stamp is applied before this sink), and its
  spool id. The failure may have come after the server committed (the COMMIT's reply lost with
  the connection): then the record is in the chain *and* in the spool, and the replay skips it.
- While the spool holds records, new records go to its end too (the chain keeps their order),
  and the database is not tried again for :data:`RETRY` seconds after a failure, so an outage
  costs one pool wait, not one per record; in the daemon, not at all while its store probe says
  the database is down (``store_up``).
- :meth:`SpoolingAudit.replay` (the daemon calls it when its store probe sees the database again;
  any later record tries it first) appends the spooled records to the chain in spool order, in
  **one** transaction under the chain's head lock, each record's spool id also kept in its line
  (``detail.spool_id``: this record was chained late). Records whose spool id is already in the
  chain are skipped (``ON CONFLICT DO NOTHING`` on the unique index, no scan of the chain): an
  unheard commit, or a crash after the replay committed and before the spool was truncated,
  neither loses nor duplicates a record.
  Then the spool is truncated (fsynced). A torn last line (a crash mid-append) is skipped: its
  append never returned.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from certd.core.clock import Clock
from certd.core.errors import StoreError
from certd.core.events import LifecycleEvent
from certd.ops.audit import record_fields
from certd.ops.log import event as log_event

log = logging.getLogger("certd.audit")

FILENAME = "audit.spool.jsonl"
RETRY = 10.0  # seconds after a failed database append before the next record tries it again


class ChainAppender(Protocol):
    """What the spool needs of the database's audit sink (:class:`certd.store.pgfeed.PgAudit`)."""

    def append(self, ev: LifecycleEvent, spool_id: str | None = None) -> dict[str, Any] | None: ...
    def append_spooled(self, records: list[tuple[str, dict[str, Any]]]) -> int: ...


class SpoolingAudit:
    """An audit sink that spools what the database does not take, and replays it (module essay)."""

    def __init__(self, chain: ChainAppender, state_dir: Path, node: str, clock: Clock) -> None:
        self._chain, self._node, self._clock = chain, node, clock
        self.path = Path(state_dir) / FILENAME
        self._lock = threading.Lock()
        self._retry_at: float | None = None  # monotonic: don't try the database before this
        self._said_down = False
        #: the daemon's store probe (certd.daemon.storehealth): while it says down, records go
        #: straight to the spool instead of waiting for the pool first
        self.store_up: Callable[[], bool] = lambda: True

    def __call__(self, ev: LifecycleEvent) -> None:
        spool_id = f"{self._node}:{uuid.uuid4()}"  # before the first try: an unheard commit is known by it
        with self._lock:
            due = self._retry_at is None or self._clock.monotonic() >= self._retry_at
            if due and self.store_up():
                try:
                    self._replay_locked()
                    self._chain.append(ev, spool_id)
                    self._retry_at = None
                    return
                except StoreError as e:
                    self._failed(e)
            elif due:
                self._failed(StoreError("the store probe says the fleet database is unreachable"))
            self._spool(spool_id, record_fields(ev))

    def pending(self) -> int:
        """The records waiting in the spool."""
        with self._locked_file() as fd:
            return len(_read(fd))

    def replay(self) -> int:
        """Append the spooled records to the chain (once each) and empty the spool; returns how
        many were appended. StoreError (the database is still away) leaves the spool as it was."""
        with self._lock:
            try:
                n = self._replay_locked()
            except StoreError as e:
                self._failed(e)
                raise
            self._retry_at = None
            return n

    # -- inside -------------------------------------------------------------------------------

    def _failed(self, e: StoreError) -> None:
        self._retry_at = self._clock.monotonic() + RETRY
        if not self._said_down:
            self._said_down = True
            log_event(log, "audit_spooling", logging.WARNING, path=str(self.path), error=str(e),
                      detail="the database is unreachable: audit records are kept locally and "
                             "appended to the chain when it is back")

    def _spool(self, spool_id: str, fields: dict[str, Any]) -> None:
        line = json.dumps({"spool_id": spool_id, "fields": fields}, ensure_ascii=True,
                          default=str, separators=(",", ":")).encode() + b"\n"
        with self._locked_file() as fd:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line  # after a torn line: this record must not be glued to it
            os.write(fd, line)
            os.fsync(fd)

    def _replay_locked(self) -> int:
        if not self.path.exists():
            return 0
        with self._locked_file() as fd:
            records = _read(fd)
            if not records:
                return 0
            appended = self._chain.append_spooled(records)
            os.ftruncate(fd, 0)
            os.fsync(fd)
        self._said_down = False
        log_event(log, "audit_spool_replayed", records=len(records), appended=appended, path=str(self.path))
        return appended

    @contextmanager
    def _locked_file(self) -> Iterator[int]:
        # a fleet node's state dir holds nothing else the database does not, and may not exist yet
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the daemon and CLI processes of this node share the spool
            yield fd
        finally:
            os.close(fd)


def _read(fd: int) -> list[tuple[str, dict[str, Any]]]:
    """The complete records of the spool, in order, as (spool id, fields with ``detail.spool_id``);
    a torn or unreadable line is skipped, logged."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    out = []
    for raw in b"".join(chunks).split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            fields, sid = rec["fields"], rec["spool_id"]
        except (ValueError, KeyError, TypeError):
            log_event(log, "audit_spool_line_skipped", logging.ERROR, line=raw[:80].decode(errors="replace"))
            continue
        out.append((sid, {**fields, "detail": {**(fields.get("detail") or {}), "spool_id": sid}}))
    return out
