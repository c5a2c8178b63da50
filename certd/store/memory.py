"""The store seam in memory (:class:`MemoryStore`): the same contracts as FileStore, for unit
tests of the engine with a fake clock, and the reference the contract suite checks others by.

One :class:`threading.Condition` guards everything, so every operation is atomic, and
:meth:`MemoryStore.handle` gives a second "process" (another node name) on the same data.
Lease expiry is judged by the injected :class:`~certd.core.clock.Clock`; nothing here sleeps
except a waiter, through the clock.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from certd.core.clock import Clock, SystemClock
from certd.core.errors import LockBusy, StoreError
from certd.core.events import LifecycleEvent
from certd.core.model import Bundle
from certd.store.port import (Conflict, DesiredChange, Fenced, Lease, LeaseLost, OrderJournal, StoredVersion,
                              VersionInfo, bound_lease, check_bound)

_POLL = 0.02


@dataclass
class _Cert:
    versions: dict[int, StoredVersion] = field(default_factory=dict)
    desired: int | None = None
    token: int = 0
    lease: Lease | None = None  # the newest grant while held
    state: dict[str, Any] | None = None
    etag: int = 0
    order: OrderJournal | None = None
    changed: int = 0  # bumped by every write: change_token()


@dataclass
class _Data:
    cond: threading.Condition = field(default_factory=threading.Condition)
    certs: dict[str, _Cert] = field(default_factory=dict)
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    journals: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    accounts: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    account_locks: dict[str, threading.Lock] = field(default_factory=dict)
    audit: list[LifecycleEvent] = field(default_factory=list)


class MemoryStore:
    """:class:`~certd.store.port.StorePort` (and the single-host Store) in memory."""

    def __init__(self, *, clock: Clock | None = None, node: str = "node1", _data: _Data | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self.node = node
        self._d = _data or _Data()
        self._bound: dict[str, Lease] = {}

    def handle(self, node: str) -> MemoryStore:
        """Another client (process, node) of the same data."""
        return MemoryStore(clock=self._clock, node=node, _data=self._d)

    def _cert(self, name: str) -> _Cert:
        return self._d.certs.setdefault(name, _Cert())

    # -- leases ------------------------------------------------------------------------------

    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease:
        deadline = self._clock.monotonic() + wait
        while True:
            with self._d.cond:
                c = self._cert(name)
                now = self._clock.now()
                if c.lease is None or c.lease.expires <= now:
                    c.token += 1
                    c.lease = Lease(name, owner, c.token, now + timedelta(seconds=ttl))
                    return c.lease
            if self._clock.monotonic() >= deadline:
                raise LockBusy(f"{name}: another owner holds the lease; try again when it has finished")
            self._clock.sleep(_POLL)

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        with self._d.cond:
            c = self._cert(lease.name)
            if c.lease is None or c.lease.token != lease.token:
                raise LeaseLost(f"{lease.name}: lease {lease.token} was lost (token {c.token})")
            c.lease = replace(lease, expires=self._clock.now() + timedelta(seconds=ttl or 24 * 3600.0))
            return c.lease

    def release(self, lease: Lease) -> None:
        with self._d.cond:
            c = self._cert(lease.name)
            if c.lease is not None and c.lease.token == lease.token:
                c.lease = None

    def check(self, lease: Lease) -> None:
        with self._d.cond:
            c = self._cert(lease.name)
            if c.lease is None or c.lease.token != lease.token:
                raise LeaseLost(f"{lease.name}: lease {lease.token} was taken over (token {c.token})")
            if c.lease.expires <= self._clock.now():
                raise LeaseLost(f"{lease.name}: lease {lease.token} expired")

    @contextmanager
    def _fenced(self, name: str, lease: Lease | None) -> Iterator[_Cert]:
        """The block runs under the store's lock, only if ``lease`` (or the lease bound by
        :meth:`lock`) still holds the newest token; then the certificate counts as changed."""
        with self._d.cond:
            lease = lease or self._bound.get(name)
            c = self._cert(name)
            if lease is not None and lease.token != c.token:
                raise Fenced(f"{name}: write refused: lease token {lease.token} is stale (token {c.token})")
            yield c
            c.changed += 1

    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]:
        return self._locked(name, timeout)

    def check_lock(self, name: str) -> None:
        check_bound(self, self._bound, name)

    def prove_with_order(self, name: str, order: OrderJournal) -> None:
        """:meth:`check_lock`, then :meth:`save_order` (a local lease: nothing to save in combining them)."""
        self.check_lock(name)
        self.save_order(name, order)

    def _locked(self, name: str, timeout: float) -> AbstractContextManager[None]:
        return bound_lease(self, self._bound, name, f"{self.node}:{threading.get_ident()}", timeout)

    # -- versions ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._d.cond:
            return sorted(n for n, c in self._d.certs.items() if c.versions or c.state is not None
                          or c.desired is not None)

    def versions(self, name: str) -> list[int]:
        with self._d.cond:
            return sorted(self._cert(name).versions)

    def load(self, name: str, version: int) -> StoredVersion:
        with self._d.cond:
            sv = self._cert(name).versions.get(version)
            if sv is None:
                raise StoreError(f"{name}: version {version} is not in the store")
            return replace(sv, meta=copy.deepcopy(sv.meta))

    def load_info(self, name: str, version: int) -> VersionInfo:
        sv = self.load(name, version)
        return VersionInfo(name, version, sv.info, sv.meta)

    def add_version(self, name: str, bundle: Bundle, meta: dict[str, Any], *, lease: Lease | None = None) -> int:
        if not bundle.cert_pem or not bundle.key_pem:
            raise ValueError("a stored version needs a certificate and its private key")
        if b"PRIVATE KEY" in json.dumps(meta, default=str).encode():
            raise ValueError("version metadata must not contain key material")
        with self._fenced(name, lease) as c:
            version = max(c.versions, default=0) + 1
            c.versions[version] = StoredVersion(name, version, bundle, copy.deepcopy(meta))
            return version

    def update_meta(self, name: str, version: int, changes: dict[str, Any], *, lease: Lease | None = None) -> None:
        with self._fenced(name, lease) as c:
            sv = c.versions.get(version)
            if sv is None:
                raise StoreError(f"{name}: version {version} is not in the store")
            c.versions[version] = replace(sv, meta={**sv.meta, **copy.deepcopy(changes)})

    def prune(self, name: str, keep: int, protect: Collection[int] = (), *, lease: Lease | None = None) -> list[int]:
        if keep < 0:
            raise ValueError("keep must be >= 0")
        with self._fenced(name, lease) as c:
            spare = {c.desired, *protect}
            excess = len(c.versions) - keep
            removed = [v for v in sorted(c.versions) if v not in spare][:max(0, excess)]
            for v in removed:
                del c.versions[v]
            return removed

    def destroy_key(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        with self._fenced(name, lease) as c:
            sv = c.versions.get(version)
            if sv is None:
                raise StoreError(f"{name}: version {version} is not in the store")
            bundle = Bundle(sv.bundle.cert_pem, sv.bundle.chain_pem, b"")
            c.versions[version] = replace(sv, bundle=bundle, meta={**sv.meta, "key_destroyed": True})

    # -- desired and applied -----------------------------------------------------------------

    def desired(self, name: str) -> int | None:
        with self._d.cond:
            return self._cert(name).desired

    current = desired

    def set_desired(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        with self._fenced(name, lease) as c:
            sv = c.versions.get(version)
            if sv is None:
                raise StoreError(f"{name}: cannot make version {version} current: it is not in the store")
            if not sv.bundle.key_pem:
                raise StoreError(f"{name}: cannot make version {version} current: its private key was destroyed")
            c.desired = version

    def applied(self, node: str, name: str) -> int | None:
        with self._d.cond:
            return self._d.applied.get((node, name))

    def set_applied(self, node: str, name: str, version: int | None) -> None:
        with self._d.cond:
            if version is None:
                self._d.applied.pop((node, name), None)
            else:
                self._d.applied[(node, name)] = version

    def set_current(self, name: str, version: int) -> None:
        self.set_desired(name, version)
        self.set_applied(self.node, name, version)

    # -- journals ----------------------------------------------------------------------------

    def load_rotation(self, node: str, name: str) -> dict[str, Any] | None:
        with self._d.cond:
            return copy.deepcopy(self._d.journals.get((node, name)))

    def save_rotation(self, node: str, name: str, journal: dict[str, Any] | None, *,
                      lease: Lease | None = None) -> None:
        with self._fenced(name, lease):
            if journal is None:
                self._d.journals.pop((node, name), None)
            else:
                self._d.journals[(node, name)] = copy.deepcopy(journal)

    def foreign_rotations(self, name: str) -> dict[str, dict[str, Any]]:
        with self._d.cond:
            return {node: copy.deepcopy(j) for (node, n), j in self._d.journals.items()
                    if n == name and node != self.node}

    def drop_rotation(self, node: str, name: str) -> None:
        with self._fenced(name, None):
            self._d.journals.pop((node, name), None)
            self._d.applied.pop((node, name), None)

    def load_journal(self, name: str) -> dict[str, Any] | None:
        return self.load_rotation(self.node, name)

    def save_journal(self, name: str, journal: dict[str, Any] | None) -> None:
        self.save_rotation(self.node, name, journal)

    def load_order(self, name: str) -> OrderJournal | None:
        with self._d.cond:
            return self._cert(name).order

    def save_order(self, name: str, order: OrderJournal | None, *, lease: Lease | None = None) -> None:
        with self._fenced(name, lease) as c:
            c.order = order

    # -- state -------------------------------------------------------------------------------

    def read_state(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        with self._d.cond:
            c = self._cert(name)
            return copy.deepcopy(c.state), (str(c.etag) if c.state is not None else None)

    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str:
        with self._fenced(name, lease) as c:
            now = str(c.etag) if c.state is not None else None
            if now != expected:
                raise Conflict(f"{name}: state changed since it was read (etag {now}, expected {expected})")
            c.state, c.etag = copy.deepcopy(state), c.etag + 1
            return str(c.etag)

    def load_state(self, name: str) -> dict[str, Any] | None:
        return self.read_state(name)[0]

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        with self._fenced(name, None) as c:
            c.state, c.etag = copy.deepcopy(state), c.etag + 1

    def change_token(self, name: str) -> Hashable:
        with self._d.cond:
            return self._cert(name).changed

    # -- change feed, audit, accounts --------------------------------------------------------

    def subscribe(self, names: Collection[str] | None = None) -> _MemorySubscription:
        return _MemorySubscription(self, names)

    @property
    def audit(self) -> _MemoryAudit:
        return _MemoryAudit(self._d)

    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        with self._d.cond:
            return self._d.accounts.get(directory_url)

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        with self._d.cond:
            self._d.accounts[directory_url] = (key_pem, registration_json)

    @contextmanager
    def account_lock(self, directory_url: str, timeout: float = 60.0) -> Iterator[None]:
        with self._d.cond:
            lock = self._d.account_locks.setdefault(directory_url, threading.Lock())
        deadline = self._clock.monotonic() + timeout
        while not lock.acquire(blocking=False):
            if self._clock.monotonic() >= deadline:
                raise LockBusy(f"another client has been registering the ACME account for {directory_url}")
            self._clock.sleep(_POLL)
        try:
            yield
        finally:
            lock.release()


class _MemoryAudit:
    """The audit sink: records kept in order (``records``)."""

    def __init__(self, data: _Data) -> None:
        self._d = data

    def __call__(self, ev: LifecycleEvent) -> None:
        with self._d.cond:
            self._d.audit.append(ev)

    @property
    def records(self) -> list[LifecycleEvent]:
        with self._d.cond:
            return list(self._d.audit)


class _MemorySubscription:
    """Looks at the desired versions every ``_POLL`` seconds of the clock while waiting (a
    fake clock's sleep just advances it, so a test never waits)."""

    def __init__(self, store: MemoryStore, names: Collection[str] | None) -> None:
        self._store = store
        self._names = None if names is None else set(names)
        self._seen = self._look()
        self._closed = False

    def _look(self) -> dict[str, int | None]:
        d = self._store._d
        with d.cond:
            return {n: c.desired for n, c in d.certs.items() if self._names is None or n in self._names}

    def changes(self, timeout: float = 0.0) -> list[DesiredChange]:
        clock = self._store._clock
        deadline = clock.monotonic() + timeout
        while not self._closed:
            now = self._look()
            found = [DesiredChange(n, v) for n, v in sorted(now.items()) if self._seen.get(n) != v]
            self._seen = now
            left = deadline - clock.monotonic()
            if found or left <= 0:
                return found
            clock.sleep(min(_POLL, left))
        return []

    def close(self) -> None:
        self._closed = True
