"""Migrate a state directory written by an older release to the current layout, on first open.

Format 1 (certd up to issue 13) kept one rotation journal per certificate in
``certs/<name>/journal.json`` and had no notion of nodes; format 2 keys the journal by
(node, certificate) and records what each node applied::

    certs/<name>/journal.json  ->  certs/<name>/nodes/<node>/journal.json   (one rename)
    (nothing)                  ->  certs/<name>/nodes/<node>/applied        (= current)
    (nothing)                  ->  store.json {"format": 2}                 (last)

Everything else keeps its place: versions, ``current`` (now the desired version), state.json
(its etag is a hash of its bytes, so old files need no change), accounts, the audit log. The
lease record (``lease.json``) is created by the first lease.

Crash safety: ``migration.json`` records the certificates done so far and is removed only
after ``store.json`` is written; every step is idempotent, so a migration that was killed is
resumed (and a finished one never runs again) by the next open. A certificate is migrated
under its lock; one that is busy (a certd of the previous release still working on it) is left
for the next open, and reads fall back to its old journal meanwhile. Two new
processes opening at once serialize on ``.migrate.lock``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Protocol

from certd.core.errors import LockBusy, StoreError
from certd import fs as fsutil
from certd.ops.log import event
from certd.store.filelease import flocked

from certd.core.clock import Clock


class FileStore(Protocol):
    """What migration needs of :class:`certd.store.files.FileStore` (a protocol, so this module
    does not import the store that calls it)."""

    root: Path
    node: str
    _clock: Clock

    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]: ...
    def names(self) -> list[str]: ...
    def desired(self, name: str) -> int | None: ...
    def applied(self, node: str, name: str) -> int | None: ...
    def set_applied(self, node: str, name: str, version: int | None) -> None: ...
    def _ensure_node_dir(self, node: str, name: str) -> Path: ...

log = logging.getLogger("certd.store")

FORMAT = 2
MARKER = "store.json"
JOURNAL = "migration.json"
CRASH_ENV = "CERTD_CRASH_AT"  # "migrated_one": SIGKILL after the first certificate (crash tests)
LOCK_WAIT = 60.0  # for another process migrating the same directory


def format_of(root: Path) -> int:
    """The layout version of the state directory ``root`` (1 when unmarked)."""
    try:
        raw = (root / MARKER).read_bytes()
    except FileNotFoundError:
        return 1
    except OSError as e:
        raise fsutil.store_error(e, root / MARKER, "read") from e
    try:
        return int(json.loads(raw)["format"])
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{root / MARKER}: corrupt store marker; restore it (or write {{\"format\": 1}} to "
                         f"migrate again)") from None


def on_open(store: FileStore) -> bool:
    """Migrate ``store``'s directory if it is older than :data:`FORMAT` and certd may write it
    (a read-only open, e.g. by an operator, reads the old layout through the fallbacks).
    True when the directory is now in the current format."""
    root = store.root
    found = format_of(root)
    if found > FORMAT:
        raise StoreError(f"{root} was written by a newer certd (store format {found}); upgrade certd")
    if found == FORMAT:
        return True
    if not (root / "certs").is_dir() or not os.access(root, os.W_OK | os.X_OK):
        return False
    with flocked(root / ".migrate.lock", store._clock, LOCK_WAIT,
                 f"another certd process has been migrating {root} for {LOCK_WAIT:g}s; try again"):
        if format_of(root) < FORMAT:  # the other process may have finished it meanwhile
            return run(store)
    return True


def run(store: FileStore) -> bool:
    """Migrate every certificate not yet done; write the marker when all are. True when done."""
    root = store.root
    journal = _load_journal(root)
    done: list[str] = journal["done"]
    resumed = bool(done)
    left = []
    for name in store.names():
        if name in done:
            continue
        try:
            with store.lock(name, timeout=0):  # busy: left for the next open, never blocks this one
                moved = migrate_cert(store, name)
        except LockBusy:
            left.append(name)
            continue
        done.append(name)
        _save_journal(root, journal)
        event(log, "store_cert_migrated", name=name, journal_moved=moved or None)
        if os.environ.get(CRASH_ENV) == "migrated_one":
            os.kill(os.getpid(), signal.SIGKILL)
    if left:
        event(log, "store_migration_deferred", logging.WARNING, names=",".join(left[:8]), count=len(left),
              reason="a certd of the previous release is working on them; the next start finishes")
        return False
    mark_current(root)
    try:
        os.unlink(root / JOURNAL)
    except FileNotFoundError:
        pass
    fsutil.fsync_dir(root)
    event(log, "store_migrated", logging.WARNING, path=root, format=FORMAT, certificates=len(done),
          resumed=resumed or None)
    return True


def migrate_cert(store: FileStore, name: str) -> bool:
    """Format 1 -> 2 for one certificate (idempotent); True if a journal was moved."""
    cert_dir = store.root / "certs" / name
    old = cert_dir / "journal.json"
    node_dir = store._ensure_node_dir(store.node, name)
    new = node_dir / "journal.json"
    moved = False
    if old.exists():
        if new.exists():
            fsutil.secure_delete(old)  # a format-2 writer's journal is the newer one
        else:
            with fsutil.os_errors(old, "move the rotation journal"):
                os.rename(old, new)
            fsutil.fsync_dir(node_dir)
            moved = True
        fsutil.fsync_dir(cert_dir)
    current = store.desired(name)
    if current is not None and store.applied(store.node, name) is None:
        store.set_applied(store.node, name, current)
    return moved


def mark_current(root: Path) -> None:
    fsutil.atomic_write(root / MARKER, json.dumps({"format": FORMAT}).encode() + b"\n", mode=0o600)


def _load_journal(root: Path) -> dict[str, Any]:
    try:
        rec = json.loads((root / JOURNAL).read_bytes())
        if isinstance(rec, dict) and isinstance(rec.get("done"), list) and rec.get("to") == FORMAT:
            return rec
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        pass  # unreadable: start over, every step is idempotent
    rec = {"to": FORMAT, "done": []}
    _save_journal(root, rec)
    return rec


def _save_journal(root: Path, rec: dict[str, Any]) -> None:
    fsutil.atomic_write(root / JOURNAL, json.dumps(rec, sort_keys=True).encode() + b"\n", mode=0o600)
