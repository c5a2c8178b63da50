"""The store seam: what certd needs from wherever it keeps certificates, as contracts.

Three implementations (:class:`certd.store.files.FileStore` on a local directory,
:class:`certd.store.memory.MemoryStore` for tests, :class:`certd.store.pg.PgStore` on a
PostgreSQL database a fleet shares). ``tests/contract/test_store_contract.py`` holds every
one of them to the contracts below.

Leases and fencing (the part a shared store gets wrong most often)
------------------------------------------------------------------
A :class:`Lease` on a certificate is granted to one *owner* at a time for ``ttl`` seconds of the
store's clock. Mutual exclusion by time alone is not safety: a holder that stalls (GC pause,
SIGSTOP, a partition) past its TTL does not know it lost the lease, and will write when it
wakes. So every grant carries a **fencing token**, strictly increasing per certificate and never
reused (not after a release, not after a restart of the store), and every write that matters
(a new version, the desired pointer, state, the journals) carries the lease it was made under.
The store refuses such a write with :class:`Fenced` once a newer token has been granted for
that certificate, atomically with the write itself (a check-then-write from the caller is not
enough). A lease that expired but was not taken over still fences nothing: its token is still
the newest. What an implementation must guarantee:

- ``lease()`` grants when the certificate's lease is free, released, or expired (by the store's
  clock), and then issues ``token = previous token + 1``; otherwise it waits up to ``wait``
  seconds, then raises :class:`~certd.core.errors.LockBusy`. It is not re-entrant: a second
  ``lease()`` for a held certificate is busy, even from the same owner.
- ``renew()`` extends a lease whose token is still the newest (:class:`LeaseLost` otherwise);
  ``release()`` frees it, is idempotent and never fails because the lease was lost.
- ``check()`` is one round trip proving the lease still holds and has not expired
  (:class:`LeaseLost`): call it right before an irreversible step outside the store (newOrder,
  finalize), which fencing cannot protect.
- An implementation may free a lease early when it *knows* the holder died (FileStore: the
  kernel drops the holder's ``flock``), never because it merely looks idle.
- Expiry is judged by **the store's clock** (a shared database's, not each node's: nodes'
  clocks disagree); :attr:`Lease.expires` is on that clock, so a caller must not compare it
  with its own. Tests inject the store's clock (a FakeClock; a database takes "now" as a query
  parameter only then).
- Atomic means atomic against a concurrent grant: checked by the PostgreSQL spike, a token
  compared in a ``WHERE`` and then written, without locking the lease row (``SELECT ... FOR
  SHARE`` in the write's transaction), lets the write commit after a takeover. FileStore does
  the check and the write under one ``flock``; MemoryStore under one mutex.
- Lease records are never deleted, only released: deleting one would restart its tokens.

Compare-and-set state
---------------------
:meth:`StateStore.read_state` returns the state with an opaque ``etag``; :meth:`StateStore.write_state`
succeeds only if the state still has that etag (``None``: "there is no state yet") and raises
:class:`Conflict` otherwise; the caller reads again and re-applies its change. No blind
read-modify-write: two processes updating the ARI cache and the failure count cannot lose one.
Etags are opaque strings: FileStore uses a hash of the file's bytes (so files written by older
releases need no change), a database a generation counter (``UPDATE ... SET etag = etag + 1
WHERE name = $1 AND etag = $2 RETURNING etag``).

Desired and applied
-------------------
``desired(name)`` is the version every node should serve (fleet-wide, written under the lease);
``applied(node, name)`` is what one node last switched to (written by that node alone, so not
fenced by the certificate's lease). On one host they differ only while a rotation is in flight.
The rotation journal (stage/switch/reload/verify) belongs to a (node, certificate); the
**order journal** belongs to the certificate, so another process (in a fleet, another node) can
resume an interrupted order: it holds the order URL and the new key, stored 0600 like every
key, written before finalize.

Change feed
-----------
:meth:`ChangeFeed.subscribe` yields "certificate X has desired version N", coalesced: a
subscriber may miss intermediate versions but always sees the latest one of every certificate
that changed since its previous call. Implementations may be polling-backed (files) or
notification-backed, but the answer always comes from reading the desired versions: a
PostgreSQL LISTEN only wakes the subscriber early (a notification to a disconnected listener
is lost, and it is delivered at commit only). A subscription may hold a connection of its
own, hence :meth:`Subscription.close`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from certd.core.clock import isoformat
from certd.core.errors import StoreError
from certd.core.events import LifecycleEvent
from certd.core.model import Bundle, CertInfo


class LeaseLost(StoreError):
    """The lease is no longer held: it expired, was released, or another owner took it over.
    The holder must stop working on the certificate (nothing it writes will be accepted)."""

    transient = False


class Fenced(LeaseLost):
    """A write carried a fencing token older than the newest one granted for the certificate:
    another owner holds (or held) the lease since. The write was not made."""


class Conflict(StoreError):
    """A compare-and-set write found another etag than the one it expected: someone changed the
    value since it was read. Read again, re-apply the change, write again."""

    transient = False


@dataclass(frozen=True)
class Lease:
    """A grant of a certificate's lease: ``token`` fences every write made under it."""

    name: str
    owner: str
    token: int
    expires: datetime  # by the store's clock


@dataclass(frozen=True)
class StoredVersion:
    """One stored version. ``meta`` is JSON-able and never holds key material (created,
    initiator, reason, serial, not_after, ...; ``key_destroyed`` once :meth:`Store.destroy_key`
    ran, and then ``bundle.key_pem`` is ``b""``)."""

    name: str
    version: int
    bundle: Bundle
    meta: dict[str, Any]

    @property
    def info(self) -> CertInfo:
        return self.bundle.info


@dataclass(frozen=True)
class VersionInfo:
    """What status and scheduling need to know about one stored version: the leaf's facts and
    the metadata, without its PEM files or its key (:meth:`Store.load_info`)."""

    name: str
    version: int
    info: CertInfo
    meta: dict[str, Any]


@dataclass(frozen=True)
class OrderJournal:
    """An ACME order in flight: enough for another process to resume it (poll ``order_url``,
    finalize with a CSR from ``key_pem``) instead of ordering again. ``key_pem`` is the new
    private key (wrapped where key custody is on); it never appears in ``meta``."""

    order_url: str
    key_pem: bytes
    created: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def intent(self) -> bool:
        """Journaled right before newOrder, with no order URL yet (empty): the order may exist
        at the CA or not; a later attempt looks for it in the account's orders list
        (:mod:`certd.acme.lookup`) rather than ordering again."""
        return not self.order_url


@dataclass(frozen=True)
class Compromise:
    """One compromised key of one certificate, as a fleet sees it now (:mod:`certd.store.pgcompromise`)."""

    name: str
    spki_sha256: str
    holding: tuple[str, ...]        # live nodes that have not destroyed their copies
    in_store: bool                  # a stored version still keeps a sealed copy
    completed_at: datetime | None   # when the completion was recorded (None: not yet)
    nodes: tuple[str, ...] = ()     # the live nodes that had destroyed it at completion

    def to_json(self) -> dict[str, Any]:
        return {"spki_sha256": self.spki_sha256, "holding": list(self.holding), "in_store": self.in_store,
                "completed_at": isoformat(self.completed_at) if self.completed_at else None,
                "nodes": list(self.nodes)}


@dataclass(frozen=True)
class DesiredChange:
    """Certificate ``name`` now has desired version ``version`` (None: no desired version)."""

    name: str
    version: int | None


# --- the contracts, one concern each -----------------------------------------------------------


class Leases(Protocol):
    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease: ...
    def renew(self, lease: Lease, ttl: float | None = None) -> Lease: ...
    def release(self, lease: Lease) -> None: ...
    def check(self, lease: Lease) -> None: ...


class Versions(Protocol):
    def names(self) -> list[str]: ...
    def versions(self, name: str) -> list[int]: ...
    def load(self, name: str, version: int) -> StoredVersion: ...
    def load_info(self, name: str, version: int) -> VersionInfo: ...
    def add_version(self, name: str, bundle: Bundle, meta: dict[str, Any], *, lease: Lease) -> int: ...
    def update_meta(self, name: str, version: int, changes: dict[str, Any], *, lease: Lease) -> None: ...
    def prune(self, name: str, keep: int, protect: Collection[int] = (), *, lease: Lease) -> list[int]: ...
    def destroy_key(self, name: str, version: int, *, lease: Lease) -> None: ...


class Pointers(Protocol):
    node: str  # this process's node name (FileStore: the host name)

    def desired(self, name: str) -> int | None: ...
    def set_desired(self, name: str, version: int, *, lease: Lease) -> None: ...
    def applied(self, node: str, name: str) -> int | None: ...
    def set_applied(self, node: str, name: str, version: int | None) -> None: ...


class Journals(Protocol):
    def load_rotation(self, node: str, name: str) -> dict[str, Any] | None: ...
    def save_rotation(self, node: str, name: str, journal: dict[str, Any] | None, *, lease: Lease) -> None: ...
    def foreign_rotations(self, name: str) -> dict[str, dict[str, Any]]: ...
    def drop_rotation(self, node: str, name: str) -> None: ...
    def load_order(self, name: str) -> OrderJournal | None: ...
    def save_order(self, name: str, order: OrderJournal | None, *, lease: Lease) -> None: ...


class StateStore(Protocol):
    def read_state(self, name: str) -> tuple[dict[str, Any] | None, str | None]: ...
    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str: ...


class Subscription(Protocol):
    def changes(self, timeout: float = 0.0) -> list[DesiredChange]: ...
    def close(self) -> None: ...


class ChangeFeed(Protocol):
    def subscribe(self, names: Collection[str] | None = None) -> Subscription: ...


class AuditSink(Protocol):
    def __call__(self, ev: LifecycleEvent) -> None: ...


class Accounts(Protocol):
    def load_account(self, directory_url: str) -> tuple[bytes, str] | None: ...
    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None: ...
    def account_lock(self, directory_url: str, timeout: float = 60.0) -> AbstractContextManager[None]: ...


@runtime_checkable
class StorePort(Leases, Versions, Pointers, Journals, StateStore, ChangeFeed, Accounts, Protocol):
    """Everything above: what a shared database must implement for certd (the contract suite)."""

    @property
    def audit(self) -> AuditSink: ...


def update_state(store: StateStore, name: str, change: Callable[[dict[str, Any]], None], *,
                 lease: Lease | None = None, attempts: int = 8) -> dict[str, Any]:
    """Read the state, apply ``change`` (in place) and write it back by compare-and-set, again
    from a fresh read on :class:`Conflict`; returns the state written. What a caller that writes
    outside the certificate's lease (the ARI cache refreshed by ``status``) should use instead
    of a blind save. :class:`Conflict` after ``attempts`` lost races."""
    for _ in range(attempts - 1):
        state, etag = store.read_state(name)
        state = dict(state or {})
        change(state)
        try:
            store.write_state(name, state, expected=etag, lease=lease)
            return state
        except Conflict:
            continue
    state, etag = store.read_state(name)
    state = dict(state or {})
    change(state)
    store.write_state(name, state, expected=etag, lease=lease)
    return state


#: TTL of the lease the single-host ``lock()`` takes: the holder releases it (or, on files, the
#: kernel drops its flock when it dies); the TTL only matters for a holder that stalls, and must
#: outlast any rotation.
LEGACY_TTL = 24 * 3600.0


@contextmanager
def bound_lease(leases: Leases, bound: dict[str, Lease], name: str, owner: str, timeout: float) -> Iterator[None]:
    """The single-host ``lock()``: take ``name``'s lease for the block and record it in
    ``bound`` (the store fences the adapter's writes with it), released at the end."""
    lease = leases.lease(name, owner, LEGACY_TTL, wait=timeout)
    bound[name] = lease
    try:
        yield
    finally:
        bound.pop(name, None)
        leases.release(lease)


def check_bound(leases: Leases, bound: dict[str, Lease], name: str) -> None:
    """The single-host ``check_lock()``: :meth:`Leases.check` of the lease ``lock()`` holds on
    ``name`` (nothing when none is held)."""
    lease = bound.get(name)
    if lease is not None:
        leases.check(lease)


class Store(Protocol):
    """The single-host interface the engine calls today (kept while the engine moves to
    :class:`StorePort`). ``lock()`` takes the certificate's lease for the block and every write
    below is fenced by it; ``check_lock()`` proves that lease still holds (a round trip, right
    before an irreversible step outside the store: newOrder, finalize); ``current`` is the
    desired version; the journal is this node's."""

    def names(self) -> list[str]: ...
    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]: ...
    def check_lock(self, name: str) -> None: ...
    def versions(self, name: str) -> list[int]: ...
    def current(self, name: str) -> int | None: ...
    def load(self, name: str, version: int) -> StoredVersion: ...
    def load_info(self, name: str, version: int) -> VersionInfo: ...
    def add_version(self, name: str, bundle: Bundle, meta: dict[str, Any]) -> int: ...
    def update_meta(self, name: str, version: int, changes: dict[str, Any]) -> None: ...
    def set_current(self, name: str, version: int) -> None: ...
    def prune(self, name: str, keep: int, protect: Collection[int] = ()) -> list[int]: ...
    def destroy_key(self, name: str, version: int) -> None: ...
    def load_journal(self, name: str) -> dict[str, Any] | None: ...
    def save_journal(self, name: str, journal: dict[str, Any] | None) -> None: ...
    def foreign_rotations(self, name: str) -> dict[str, dict[str, Any]]: ...
    def drop_rotation(self, node: str, name: str) -> None: ...
    def load_order(self, name: str) -> OrderJournal | None: ...
    def save_order(self, name: str, order: OrderJournal | None, *, lease: Lease | None = None) -> None: ...
    def prove_with_order(self, name: str, order: OrderJournal) -> None:
        """``check_lock(name)`` and ``save_order(name, order)`` at once (the order intent right
        before newOrder): PostgreSQL proves and extends the lease in the statement that writes
        the journal, one round trip for both. LeaseLost as ``check_lock``."""
    def load_state(self, name: str) -> dict[str, Any] | None: ...
    def save_state(self, name: str, state: dict[str, Any]) -> None: ...
    def read_state(self, name: str) -> tuple[dict[str, Any] | None, str | None]: ...
    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str: ...
    def change_token(self, name: str) -> Hashable: ...
    def load_account(self, directory_url: str) -> tuple[bytes, str] | None: ...
    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None: ...
    @property
    def audit(self) -> AuditSink: ...
