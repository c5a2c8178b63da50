"""The audit log: an append-only, hash-chained JSON Lines record of every lifecycle event.

``<state_dir>/audit.jsonl`` holds one JSON object per line, one per
:class:`~certd.core.events.LifecycleEvent`::

    {"seq": 17, "time": "2026-01-01T12:00:00.123Z", "event": "renewed", "name": "www",
     "initiator": "uid=0(root)", "reason": "...", "old_serial": "...", "new_serial": "...",
     "spki_sha256": "...", "not_after": "...", "outcome": "success", "duration": 1.2,
     "version": 3, "detail": {}, "prev": "<64 hex>", "hash": "<64 hex>"}

Tamper evidence comes from two hashes per record:

- ``hash`` is SHA-256 of the record's canonical JSON without ``hash`` (sorted keys, no spaces,
  ASCII): editing any field of a line breaks that line's own hash;
- ``prev`` is SHA-256 of the previous line's exact bytes (without its newline; the first
  record's ``prev`` is 64 zeros): removing, inserting or reordering lines breaks the link of
  the line after the change, and ``seq`` (1, 2, 3, ...) shows where records went missing.

``audit.head`` beside the log holds the last record's ``seq`` and ``hash``, so removing whole
records from the end is noticed too. None of this stops someone with write access who rewrites
the entire chain and the head; that is detected only by comparing with a head hash kept
elsewhere: ``certd run`` logs ``audit_record seq=N hash=H`` for every record (journald),
and ``certd audit verify --head H`` checks that such an exported hash is still in the chain.

Several processes append (the daemon and the in-process CLI). Each append opens the file,
takes an exclusive ``flock`` on it, reads the tail to find ``seq`` and ``prev``, appends its
line(s) with a single ``write``, fsyncs, updates the head and only then unlocks, so the chain
never forks. Within a process, records that threads append at the same moment are written
together (group commit: one write, one fsync, one head update for all of them); the records of
steps inside an operation (:data:`LAZY_EVENTS`) are not fsynced on their own but by the
operation's last record, appended to the same file later. The file is
created 0600 (0640 with a group). A record whose text holds a PEM private-key
marker is refused (:class:`AuditRefused`): the audit log never stores key material.
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from certd import fs as fsutil
from certd.core.clock import utc
from certd.core.errors import StoreError, UsageError
from certd.core.events import LifecycleEvent
from certd.ops.auditchain import (FILENAME, GENESIS, HEAD_FILENAME, MAX_PROBLEMS, Verification, canonical,
                                  line_hash, parse_line, record_hash, verify_lines)
from certd.ops.log import event as log_event

log = logging.getLogger("certd.audit")

__all__ = ["FILENAME", "HEAD_FILENAME", "GENESIS", "MAX_PROBLEMS", "AuditLog", "AuditRefused", "Verification",
           "canonical", "history", "line_hash", "open_for", "record_fields", "record_hash", "record_line",
           "verify_lines"]

# The order records are written in (readable); hashing uses sorted keys, so order never matters.
FIELDS = ("seq", "time", "event", "name", "initiator", "reason", "old_serial", "new_serial", "spki_sha256",
          "not_after", "outcome", "duration", "version", "detail", "prev")
#: Records of steps inside a renewal or rollback, appended without an fsync of their own: the
#: operation's last record (``renewed``, ``renewal_failed``, ``rolled_back``, ...) is fsynced,
#: and an fsync of the file makes every line written before it durable. A power loss before
#: that end can lose these lines (never a line in the middle: they are the file's tail), and
#: the rotation journal, not the audit log, is what recovery finishes from.
LAZY_EVENTS = frozenset({"forced", "issued", "deployed", "verified", "version_pruned"})
_KEY_MARKER = re.compile(rb"-----(?:BEGIN|END) (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_TAIL_CHUNK = 8192


class AuditRefused(ValueError):
    """A record was not written because it would have put key material in the audit log."""


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return utc(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(ev: LifecycleEvent) -> dict[str, Any]:
    return {"time": _iso(ev.time), "event": ev.kind, "name": ev.name, "initiator": ev.initiator,
            "reason": ev.reason, "old_serial": ev.old_serial, "new_serial": ev.new_serial,
            "spki_sha256": ev.spki_sha256, "not_after": _iso(ev.not_after), "outcome": ev.outcome,
            "duration": round(ev.duration, 3) if ev.duration is not None else None,
            "version": ev.version, "detail": ev.detail}


def record_fields(ev: LifecycleEvent) -> dict[str, Any]:
    """The fields of ``ev``'s record, without ``seq``, ``prev`` and ``hash`` (every audit log,
    this file's or a database's, writes the same record); :class:`AuditRefused` if they would
    hold key material."""
    fields = _fields(ev)
    probe = json.dumps(fields, ensure_ascii=True, default=str).encode()
    if _KEY_MARKER.search(probe):
        log_event(log, "audit_refused", logging.ERROR, event=ev.kind, name=ev.name,
                  why="the record held a private-key marker; it was not written")
        raise AuditRefused(f"audit record for {ev.kind} {ev.name or '-'} refused: it held private key material")
    return fields


def record_line(record: dict[str, Any]) -> bytes:
    """A complete record (with ``seq``, ``prev``, ``hash``) as one line of the log, without its newline."""
    return json.dumps({k: record[k] for k in (*FIELDS, "hash")}, ensure_ascii=True, default=str,
                      separators=(", ", ": ")).encode()


@dataclass
class _Pending:
    """One record waiting for the writer (see :meth:`AuditLog.append`)."""

    fields: dict[str, Any]
    record: dict[str, Any] | None = None
    error: BaseException | None = None
    done: bool = False


class AuditLog:
    """Appends records to, and reads, one audit log. Construction does no I/O."""

    def __init__(self, path: Path, *, group: str | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(HEAD_FILENAME)
        self._group = group
        self._mode = 0o600 if group is None else 0o640
        self._lock = threading.Lock()  # one writer at a time in this process (flock: across processes)
        self._queue: list[_Pending] = []   # records waiting for the writer; guarded by _queue_lock
        self._queue_lock = threading.Lock()

    # -- writing --------------------------------------------------------------------------

    def __call__(self, ev: LifecycleEvent) -> None:
        """An :data:`~certd.core.events.Sink`: append ``ev``."""
        self.append(ev)

    def append(self, ev: LifecycleEvent) -> dict[str, Any]:
        """Append one record for ``ev`` (fsynced, unless a :data:`LAZY_EVENTS` record) and return
        it. :class:`AuditRefused` if it would hold key material;
        :class:`~certd.core.errors.StoreError` if the disk refuses."""
        fields = record_fields(ev)
        # Group commit: the thread that gets the writer's lock writes every record queued by then
        # (its own included) with one write and one fsync; the others find theirs done. Each
        # caller still returns only once its record is durable, but eight renewal workers no
        # longer pay three fsyncs each, one after the other, for every event.
        mine = _Pending(fields)
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    for pending, appended in zip(batch, self._append_locked([p.fields for p in batch])):
                        pending.record = appended
                except BaseException as e:  # noqa: BLE001 - every caller in the batch gets the failure
                    for pending in batch:
                        pending.error = e
                for pending in batch:
                    pending.done = True
        if mine.error is not None:
            raise mine.error
        record = mine.record
        assert record is not None
        log_event(log, "audit_record", seq=record["seq"], hash=record["hash"])  # the head, kept outside the file
        return record

    def _open(self) -> int:
        fsutil.ensure_dir(self.path.parent, 0o700)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        with fsutil.os_errors(self.path, "open"):
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return os.open(self.path, flags)
            try:
                if self._gid() != -1:
                    os.fchown(fd, -1, self._gid())
                os.fchmod(fd, self._mode)
            except OSError:
                pass  # stays 0600: narrower is safe
            fsutil.fsync_dir(self.path.parent)
            return fd

    def _gid(self) -> int:
        try:
            return grp.getgrnam(self._group).gr_gid if self._group is not None else -1
        except KeyError:
            return -1

    def _append_locked(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append one record per fields dict, chained in order, with one write and, unless every
        one is a :data:`LAZY_EVENTS` record, one fsync and a new head. After lazy records alone
        the head stays behind until the next durable append (a head ahead of what a power loss
        kept would look like records cut off the end)."""
        durable = any(f.get("event") not in LAZY_EVENTS for f in batch)
        fd = self._open()
        try:
            with fsutil.os_errors(self.path, "lock"):
                fcntl.flock(fd, fcntl.LOCK_EX)
            with fsutil.os_errors(self.path, "read"):
                size = os.fstat(fd).st_size
                last, complete = _last_line(fd, size)
                seq = _last_seq(fd, size, last)
            records, lines = [], []
            for fields in batch:
                seq += 1
                record = {"seq": seq, **fields, "prev": line_hash(last) if last is not None else GENESIS}
                record["hash"] = record_hash(record)
                last = record_line(record)
                records.append(record)
                lines.append(last + b"\n")
            data = (b"" if complete else b"\n") + b"".join(lines)  # a torn last line stays a line of its own
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    fsutil.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)  # never leave half a record behind
                except OSError:
                    pass
                raise fsutil.store_error(e, self.path, "append to") from e
            if not durable:
                return records
            try:
                # Not durable (no directory fsync): a crash can only leave an older head behind,
                # and a lagging head is no tamper sign; a torn one cannot happen.
                fsutil.atomic_write(self.head_path, _head_bytes(seq, records[-1]["hash"]), mode=self._mode,
                                    gid=self._gid(), durable=False)
            except StoreError as e:  # the records themselves are durable; a lagging head is not a tamper sign
                log_event(log, "audit_head_not_written", logging.WARNING, seq=seq, error=str(e))
            return records
        finally:
            os.close(fd)  # releases the flock

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last record as ``audit.head`` records it; None before the first."""
        try:
            data = json.loads(self.head_path.read_bytes())
            return int(data["seq"]), str(data["hash"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- reading --------------------------------------------------------------------------

    def lines(self) -> list[bytes]:
        """Every line's bytes (without newlines); a last line without newline is kept as it is."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise fsutil.store_error(e, self.path, "read") from e
        if not raw:
            return []
        parts = raw.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        return parts

    def records(self) -> list[dict[str, Any]]:
        """Every parseable record, in file order (what ``certd history`` shows)."""
        out = []
        for line in self.lines():
            rec = parse_line(line)
            if rec is not None:
                out.append(rec)
        return out

    def verify(self, expect_head: str | None = None) -> Verification:
        """Walk the chain; see :class:`Verification`. Log and head are read under a shared
        flock, so an append in progress is never mistaken for records cut off the end."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return verify_lines(self.path.name, None, self.head(), self.head_path.exists(), expect_head)
        except OSError as e:
            raise fsutil.store_error(e, self.path, "read") from e
        try:
            with fsutil.os_errors(self.path, "read"):
                fcntl.flock(fd, fcntl.LOCK_SH)
                raw = _read_all(fd, os.fstat(fd).st_size)
            head, head_exists = self.head(), self.head_path.exists()
        finally:
            os.close(fd)
        return verify_lines(self.path.name, raw, head, head_exists, expect_head)


def _head_bytes(seq: int, h: str) -> bytes:
    return (json.dumps({"seq": seq, "hash": h}) + "\n").encode()


def _last_line(fd: int, size: int) -> tuple[bytes | None, bool]:
    """(the last line's bytes without newline or None if empty, whether it ends with a newline)."""
    if size == 0:
        return None, True
    complete = os.pread(fd, 1, size - 1) == b"\n"
    end = size - 1 if complete else size
    buf, pos = b"", end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        nl = buf.rfind(b"\n")
        if nl >= 0:
            return buf[nl + 1:], complete
    return buf, complete


def _last_seq(fd: int, size: int, last: bytes | None) -> int:
    """The last ``seq`` so far: the last line's or, after a damaged tail (rare), counted by a scan."""
    if last is None:
        return 0
    rec = parse_line(last)
    if rec is not None:
        return int(rec["seq"])
    seq = 0
    for line in _read_all(fd, size).split(b"\n"):
        if line:
            r = parse_line(line)
            seq = int(r["seq"]) if r is not None else seq + 1  # as verify counts: a bad line stood for one record
    return seq


def _read_all(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def iter_matching(records: list[dict[str, Any]], name: str | None) -> Iterator[dict[str, Any]]:
    """Records about ``name`` (all when None); daemon-wide records (name "") only when unfiltered."""
    for rec in records:
        if name is None or rec.get("name") == name:
            yield rec


def history(state_dir: Path, name: str | None, configured: Any, names_summary: str) -> dict[str, Any]:
    """What ``certd history [NAME]`` shows, read by whoever may read the log (the CLI as root or
    the certd user, or the daemon for ``GET /v1/history``): ``{"records": [...], "chain_intact":
    bool}``. A name neither configured nor in any record is a usage error; a log certd may not
    read says who can (exit 2), like the control socket's refusal."""
    log = open_for(state_dir)
    try:
        records = log.records()
        intact = log.verify().ok
    except StoreError as e:
        if isinstance(e.__cause__, PermissionError):
            raise UsageError(f"cannot read {log.path}: permission denied; run as root or as the certd user, "
                             f"or start the daemon (certd history then asks it)") from None
        raise
    if name is not None and name not in configured and not any(r.get("name") == name for r in records):
        raise UsageError(f"unknown certificate {name}; configured: {names_summary}")
    return {"records": list(iter_matching(records, name)), "chain_intact": intact}


def history_of(records: list[dict[str, Any]], intact: bool, name: str | None, configured: Any,
               names_summary: str) -> dict[str, Any]:
    """:func:`history`'s document from records read elsewhere (a fleet's database)."""
    if name is not None and name not in configured and not any(r.get("name") == name for r in records):
        raise UsageError(f"unknown certificate {name}; configured: {names_summary}")
    return {"records": list(iter_matching(records, name)), "chain_intact": intact}


def open_for(state_dir: Path, group: str | None = None) -> AuditLog:
    """The audit log of a state directory."""
    return AuditLog(Path(state_dir) / FILENAME, group=group)


