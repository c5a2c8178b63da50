"""Where certd keeps what it issued, on a local directory: :class:`FileStore`.

It implements the store seam (:mod:`certd.store.port`, read that first for the guarantees)
and the single-host :class:`~certd.store.port.Store` the engine calls today. Layout under the
state directory (format 2; docs/STORE.md draws it whole, with the migration from format 1)::

    store.json                                 {"format": 2}, written by the migration
    accounts/...                               certd.store.fileaccounts
    audit.jsonl audit.head                     certd.ops.audit
    certs/<name>/versions/<NNNN>/...           certd.store.fileversions
    certs/<name>/current -> versions/NNNN      the desired version
    certs/<name>/state.json                    renewal bookkeeping; etag = SHA-256 of its bytes
    certs/<name>/lease.json lease.lock lock    certd.store.filelease
    certs/<name>/order.json order.key (0600)   the order journal (order.sealed with [keys])
    certs/<name>/nodes/<node>/journal.json     that node's rotation journal, absent when idle
    certs/<name>/nodes/<node>/applied          the version that node last switched to

The single-host adapter: :meth:`FileStore.lock` takes the certificate's lease (and keeps the
``lock`` flock, so a SIGKILLed holder frees it at once) and binds it to the name, so the
adapter's writes (``add_version``, ``set_current``, ``save_journal``, ``save_state``...) are
fenced by it without the engine passing it around. It is not re-entrant.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from certd.core.clock import Clock, SystemClock
from certd.core.errors import ConfigError, StoreError
from certd.config import Config
from certd.crypto.custody import CustodyError, Kek, KeyRing
from certd.crypto.kekload import load_keyring, load_source
from certd import fs as fsutil
from certd.ops.audit import AuditLog, open_for
from certd.store import fileio, migrate
from certd.store.feed import PollingSubscription
from certd.store.fileaccounts import FileAccounts
from certd.store.filekeys import KeyFiles, order_place
from certd.store.filelease import FileLeases
from certd.store.fileversions import VersionFiles, writes
from certd.store.port import LEGACY_TTL, Conflict, Lease, OrderJournal, Store, StoredVersion, VersionInfo

__all__ = ["FileStore", "open_file_store", "Store", "StoredVersion", "VersionInfo", "LEGACY_TTL", "node_name"]



def open_file_store(config: Config, *, audit_group: str | None = None, clock: Clock | None = None) -> FileStore:
    """The configured state directory, sealing keys under ``[keys]``'s KEK when it is set
    (:class:`~certd.crypto.custody.CustodyError` when the KEK cannot be loaded)."""
    ring, loader = keyring_of(config)
    return FileStore(config.daemon.state_dir, audit_group=audit_group, clock=clock, keyring=ring, kek_loader=loader)


def keyring_of(config: Config) -> tuple[KeyRing | None, Callable[[str], Kek] | None]:
    """``[keys]``'s ring and KEK loader (both None without it); :class:`ConfigError` when the
    KEK cannot be loaded."""
    keys = config.keys
    if keys is None:
        return None, None
    try:
        ring = load_keyring(keys)
    except CustodyError as e:
        if e.transient:  # a token pulled out: an operation that failed (exit 1), not the configuration
            raise
        raise ConfigError(f"{config.path}: [keys]: {e}") from None  # exit 2, like any config problem
    return ring, (lambda source: load_source(keys, source))


def node_name(raw: str | None = None) -> str:
    """This node's name in the store: the host name, made a valid file name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", raw if raw is not None else socket.gethostname())[:64]
    return name if fileio.NAME_RE.fullmatch(name) else f"n{name}"[:64]


class FileStore(VersionFiles):
    """The store seam on a local directory.

    Directories are 0700 and key files 0600; with ``key_group`` the version key files are 0640
    and the directories on the way to them 0750, both owned by that group. Account keys and
    the order journal's key stay 0600. With ``keyring`` (``[keys]``) every key is sealed at
    rest instead (certd.store.filekeys). Opening a directory written by an older release
    migrates it (certd.store.migrate) when certd may write it.
    """

    def __init__(self, state_dir: Path, *, key_group: str | None = None, node: str | None = None,
                 clock: Clock | None = None, audit_group: str | None = None, keyring: KeyRing | None = None,
                 kek_loader: Callable[[str], Kek] | None = None) -> None:
        self.root = Path(state_dir)
        self._gid = -1
        if key_group is not None:
            try:
                self._gid = grp.getgrnam(key_group).gr_gid
            except KeyError:
                raise StoreError(f"key group {key_group!r} does not exist; create it or drop the setting") from None
        self._dir_mode = 0o700 if self._gid == -1 else 0o750
        self._key_mode = 0o600 if self._gid == -1 else 0o640
        self._clock: Clock = clock or SystemClock()
        self._certs = os.fspath(self.root / "certs")
        self._count_own_writes()
        self.node = node_name(node)
        self._leases = FileLeases(self._ensure_cert_path, self._clock)
        self._keys = KeyFiles(self.root, keyring, kek_loader, self._key_guard)
        self._accounts = FileAccounts(self.root, self._clock, self._dir_mode, self._gid, self._keys)
        self._audit_group = audit_group
        self._audit: AuditLog | None = None
        self._bound: dict[str, Lease] = {}  # name -> lease taken by lock() (single-host adapter)
        self._mutex = threading.Lock()
        #: False once the directory is known to be format 2: no journal in the old place then.
        self._old_journals = not migrate.on_open(self)

    def _created(self) -> None:
        migrate.mark_current(self.root)  # nothing to migrate in a directory this release made
        self._old_journals = False

    # -- leases ------------------------------------------------------------------------------

    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease:
        return self._leases.lease(name, owner, ttl, wait=wait)

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        return self._leases.renew(lease, LEGACY_TTL if ttl is None else ttl)

    def release(self, lease: Lease) -> None:
        self._leases.release(lease)

    def check(self, lease: Lease) -> None:
        self._leases.check(lease)

    def _fence(self, name: str, lease: Lease | None) -> AbstractContextManager[None]:
        if lease is None:
            with self._mutex:
                lease = self._bound.get(name)
        return self._leases.fenced(name, lease)  # which makes the certificate's directory first

    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]:
        """The single-host lock: the certificate's lease for the block, bound to ``name`` so
        the adapter's writes are fenced by it; :class:`LockBusy` after ``timeout`` seconds."""
        return self._locked(name, timeout)

    def check_lock(self, name: str) -> None:
        """Prove the lease ``lock()`` holds on ``name`` (LeaseLost if it does not)."""
        with self._mutex:
            lease = self._bound.get(name)
        if lease is not None:
            self._leases.check(lease)

    @writes
    def prove_with_order(self, name: str, order: OrderJournal) -> None:
        """:meth:`check_lock`, then :meth:`save_order` (a local lease: nothing to save in combining them)."""
        self.check_lock(name)
        self.save_order(name, order)

    @contextmanager
    def _locked(self, name: str, timeout: float) -> Iterator[None]:
        owner = f"{self.node}:{os.getpid()}:{threading.get_ident()}"
        lease = self._leases.lease(name, owner, LEGACY_TTL, wait=timeout)
        with self._mutex:
            self._bound[name] = lease
        try:
            yield
        finally:
            with self._mutex:
                if self._bound.get(name) == lease:
                    del self._bound[name]
            self._leases.release(lease)

    # -- desired and applied -----------------------------------------------------------------

    @writes
    def set_current(self, name: str, version: int) -> None:
        """Single-host: the version is desired and, once switched here, applied by this node."""
        self.set_desired(name, version)
        self.set_applied(self.node, name, version)

    def _node_dir(self, node: str, name: str) -> Path:
        return Path(self._node_path(node, name))

    def _node_path(self, node: str, name: str) -> str:
        """``_node_dir`` as a string (the journal is read per certificate by ``status``)."""
        if node != self.node and not fileio.NAME_RE.fullmatch(node):
            raise ValueError(f"invalid node name {node!r}")
        return f"{self._cert_path(name)}/nodes/{node}"

    def _ensure_node_dir(self, node: str, name: str) -> Path:
        d = self._node_dir(node, name)
        if not d.is_dir():
            self._ensure_cert_dir(name)
            for p in (d.parent, d):
                fsutil.ensure_dir(p, 0o700)
        return d

    def applied(self, node: str, name: str) -> int | None:
        path = f"{self._node_path(node, name)}/applied"
        try:
            raw = fileio.read(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise fsutil.store_error(e, path, "read") from e
        text = raw.decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None

    @writes
    def set_applied(self, node: str, name: str, version: int | None) -> None:
        """Written by ``node`` alone (not fenced), lazily (no fsync): after a crash the journal,
        not this report, says what to finish, and a report a power loss tore reads as None."""
        path = self._ensure_node_dir(node, name) / "applied"
        if version is None:
            fileio.remove(path)
        else:
            fsutil.atomic_write(path, f"{version}\n".encode(), mode=0o600, lazy=True)

    # -- journals ----------------------------------------------------------------------------

    def load_rotation(self, node: str, name: str) -> dict[str, Any] | None:
        base = self._node_path(node, name)
        found = fileio.load_obj(f"{base}/journal.json", "rotation journal")
        if found is None and node == self.node and self._old_journals:  # not migrated yet: the old place
            found = fileio.load_obj(f"{self._cert_path(name)}/journal.json", "rotation journal")
        return _newer_step(found, base)

    @writes
    def save_rotation(self, node: str, name: str, journal: dict[str, Any] | None, *,
                      lease: Lease | None = None) -> None:
        """Write or, with None, remove ``node``'s rotation journal. A step that decides recovery
        (the start, the turn to a rollback, a failure's end), and the first step saved for a
        rotation whatever it is, replaces ``journal.json``, fsynced with its directory; a later
        step of :data:`LAZY_STEPS` only replaces ``journal.next``, without an fsync."""
        d = self._ensure_node_dir(node, name)
        with self._fence(name, lease):
            if journal is None:
                fileio.remove(d / NEXT_STEP_FILE)
                fileio.remove(d / "journal.json")
                if node == self.node and self._old_journals:
                    fileio.remove(self._cert_dir(name) / "journal.json")  # format 1's, if any
            elif journal.get("step") in LAZY_STEPS and _same_rotation(d / "journal.json", journal):
                fsutil.atomic_write(d / NEXT_STEP_FILE, fileio.json_bytes(journal), mode=0o600, lazy=True)
            else:
                fsutil.atomic_write(d / "journal.json", fileio.json_bytes(journal), mode=0o600)

    def foreign_rotations(self, name: str) -> dict[str, dict[str, Any]]:
        """Other nodes' rotation journals of ``name`` (on one host: none), by node."""
        try:
            nodes = sorted(p.name for p in Path(f"{self._cert_path(name)}/nodes").iterdir())
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise fsutil.store_error(e, f"{self._cert_path(name)}/nodes", "list") from e
        found = {node: self.load_rotation(node, name) for node in nodes
                 if node != self.node and fileio.NAME_RE.fullmatch(node)}
        return {node: j for node, j in found.items() if j is not None}

    @writes
    def drop_rotation(self, node: str, name: str) -> None:
        """Remove ``node``'s rotation journal of ``name`` and its applied report (fenced)."""
        d = self._node_dir(node, name)
        with self._fence(name, None):
            for f in (NEXT_STEP_FILE, "journal.json", "applied"):
                fileio.remove(d / f)

    def load_journal(self, name: str) -> dict[str, Any] | None:
        return self.load_rotation(self.node, name)

    @writes
    def save_journal(self, name: str, journal: dict[str, Any] | None) -> None:
        self.save_rotation(self.node, name, journal)

    def load_order(self, name: str) -> OrderJournal | None:
        d = self._cert_path(name)
        rec = fileio.load_obj(f"{d}/order.json", "order journal")
        if rec is None:
            return None
        key_pem = self._keys.read(order_place(d, name), f"{name}: the order journal")
        if key_pem is None:
            raise StoreError(f"{name}: the order journal {d}/order.json has no key beside it; remove order.json "
                             f"(the next renewal orders afresh)")
        return OrderJournal(str(rec["order_url"]), key_pem, str(rec["created"]), dict(rec.get("meta") or {}))

    @writes
    def save_order(self, name: str, order: OrderJournal | None, *, lease: Lease | None = None) -> None:
        """The key (0600, or sealed) first, the record last, both fsynced, then one fsync of
        the directory: a recorded order always has its key, and is durable before finalize.
        None: the record first, then the key, zeroed (only unlinked when the stored version
        shares it: see ``_linked_order_key``), without a directory fsync: the next one of this
        directory (the commit's ``current``) makes it durable, and a journal a power loss brings
        back is recognised as done (certd.engine.orders: its certificate is stored).
        An intent (no order URL yet: :attr:`OrderJournal.intent`) is written the same way but
        without any fsync: a SIGKILL does not lose the page cache, a power loss right then costs
        at most one order more, and a renewal pays no fsync for it (issue 20); the journal of
        the order's URL that follows is durable as ever."""
        d = self._ensure_cert_dir(name)
        place = order_place(os.fspath(d), name)
        with self._fence(name, lease):
            if order is None:
                fileio.remove(d / "order.json", durable=False)
                self._keys.destroy(place, durable=False)
                return
            lazy = order.intent
            self._keys.write(place, order.key_pem, durable=False, lazy=lazy)
            fsutil.atomic_write(d / "order.json", fileio.meta_bytes(
                {"order_url": order.order_url, "created": order.created, "meta": order.meta}), mode=0o600,
                durable=False, lazy=lazy)
            if not lazy:
                fsutil.fsync_dir(d)

    # -- key custody -------------------------------------------------------------------------

    def _key_guard(self, name: str | None, wait: float) -> AbstractContextManager[None]:
        """Sealing or re-wrapping a certificate's keys waits for its lock (a rotation in flight
        may prune or destroy a key meanwhile); the accounts need none (written once, at
        registration, already sealed under the newest KEK)."""
        return self.lock(name, timeout=wait) if name is not None else nullcontext()

    @property
    def keys(self) -> KeyFiles:
        """How keys are kept at rest here (sealing an existing directory, KEK rotation, census)."""
        return self._keys

    # -- state (compare-and-set) -------------------------------------------------------------

    def read_state(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        path = f"{self._cert_path(name)}/state.json"
        try:
            raw = fileio.read(path)
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise fsutil.store_error(e, path, "read") from e
        return _state_obj(raw, path), _etag(raw)

    @writes
    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str:
        data = fileio.json_bytes(state)
        with self._fence(name, lease):
            _, now = self.read_state(name)
            if now != expected:
                raise Conflict(f"{name}: state changed since it was read (etag {now}, expected {expected})")
            # Not durable: a power loss may bring the previous bookkeeping back (never a torn
            # file); the version, the journal and the audit record say what happened.
            fsutil.atomic_write(self._cert_dir(name) / "state.json", data, mode=0o600, durable=False)
        return _etag(data)

    def load_state(self, name: str) -> dict[str, Any] | None:
        return self.read_state(name)[0]

    @writes
    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Single-host adapter: last writer wins (the engine's own in-memory floor covers a
        lost write); fenced by the lease ``lock()`` bound, when there is one."""
        with self._fence(name, None):
            fsutil.atomic_write(self._cert_dir(name) / "state.json", fileio.json_bytes(state), mode=0o600,
                                durable=False)

    def change_token(self, name: str) -> Hashable:
        """A cheap value that differs whenever anything desired(), load_info() of the desired
        version, load_state() or load_journal() would read for ``name`` has changed: what a
        cache of those may be keyed by. Every write here replaces a file or the ``current``
        link by rename(), so a changed file has a new inode; four syscalls, no reads."""
        base = self._cert_path(name)
        try:
            target: str | None = os.readlink(f"{base}/current")
        except OSError:
            target = None
        meta = fileio.identity(f"{base}/{target}/meta.json") if target else None
        return (target, meta, fileio.identity(f"{base}/state.json"),
                fileio.identity(f"{base}/nodes/{self.node}/journal.json"),
                fileio.identity(f"{base}/nodes/{self.node}/{NEXT_STEP_FILE}"))

    # -- change feed, audit, accounts --------------------------------------------------------

    def subscribe(self, names: Collection[str] | None = None) -> PollingSubscription:
        return PollingSubscription(self.desired, self.names, self._clock, names)

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            self._audit = open_for(self.root, self._audit_group)
        return self._audit

    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        return self._accounts.load_account(directory_url)

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        self._accounts.save_account(directory_url, key_pem, registration_json)

    def account_lock(self, directory_url: str, timeout: float = 60.0) -> AbstractContextManager[None]:
        return self._accounts.account_lock(directory_url, timeout)


#: The rotation steps written lazily (``journal.next``, no fsync): each is reached by an
#: effect that was itself made durable first (staged files and the switch are fsynced, the
#: commit's ``current`` link too), and every effect is idempotent, so a power loss that takes
#: the step back only makes recovery redo an effect that is already done. The steps that
#: decide what recovery does (``issued``: a rotation to this version is in flight, whose
#: switch must never be found orphaned; ``rolling_back``: go backwards; the failures' ends)
#: are written to ``journal.json`` and fsynced. docs/PERFORMANCE.md has the whole table.
LAZY_STEPS = frozenset({"staged", "switched", "reloaded", "verified", "committed"})
NEXT_STEP_FILE = "journal.next"


def _same_rotation(path: Path, journal: dict[str, Any]) -> bool:
    """Whether ``path`` durably records an earlier step of ``journal``'s rotation (same id)."""
    try:
        durable = json.loads(fileio.read(os.fspath(path)).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(durable, dict) and journal.get("id") is not None and durable.get("id") == journal.get("id")


def _newer_step(journal: dict[str, Any] | None, node_dir: str) -> dict[str, Any] | None:
    """``journal`` or, when ``journal.next`` carries a later step of the same rotation (same
    id, longer history), that one; ``journal.next`` alone when there is no ``journal.json``
    (a caller that only ever saved lazy steps). A ``journal.next`` a power loss left empty or
    torn, or one of an earlier rotation, is ignored: it was never the only record of anything
    recovery needs."""
    try:
        nxt = json.loads(fileio.read(f"{node_dir}/{NEXT_STEP_FILE}").decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return journal
    if not isinstance(nxt, dict):
        return journal
    if journal is None:
        return nxt
    if (nxt.get("id") == journal.get("id") and isinstance(nxt.get("history"), list)
            and len(nxt["history"]) > len(journal.get("history") or ())):
        return nxt
    return journal


def _etag(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]


def _state_obj(raw: bytes, path: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: corrupt certificate state ({e}); restore it or move it aside") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: corrupt certificate state (not a JSON object); move it aside to continue")
    return obj
