"""The fleet's per-certificate lock on PostgreSQL: a short lease, kept alive while held.

On one host the single-host ``lock()`` takes a 24 h lease and relies on the holder releasing it
(or the kernel dropping a flock). In a fleet a holder can vanish (SIGKILL, power, partition), and
another node must take over in bounded time, so the lease is short and a keeper thread renews it
while the block runs. The numbers (see docs/FLEET.md, "How nodes agree"):

- ``ttl`` = ``[acme] order_timeout`` + :data:`CONNECTION_BOUND` + :data:`MARGIN`. A holder proves
  the lease with :meth:`FleetLock.check` (a renewal: one round trip with its token, extending the
  lease to now + ``ttl`` by the database's clock) right before newOrder and before finalize. The
  request that follows ends within ``order_timeout``; a holder cut off from the database loses
  its connections within :data:`CONNECTION_BOUND` (libpq keepalives, ``tcp_user_timeout``); so no
  other node can be granted the lease while that request may still reach the CA.
- The keeper renews every ``ttl / 4``; a renewal that fails because the database is unreachable
  is retried at the next tick (the lease may lapse: then every later write of the holder is
  refused as soon as another node took it over — fencing, not timing, is what keeps writes safe).

Within one process the same certificate is also serialised by a plain mutex (:meth:`local`),
which the fleet's apply loop takes alone: deploying the desired version on this node needs no
fleet-wide lease, only to not race this node's own rotation.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from certd.core.clock import Clock
from certd.core.errors import LockBusy, StoreError
from certd.ops.log import event
from certd.store.port import Lease, LeaseLost

log = logging.getLogger("certd.store")

#: seconds within which a node cut off from the database has lost its connections
#: (pgschema.CONNECT_DEFAULTS: connect_timeout 10 s, tcp_user_timeout 15 s, keepalives 10+3x3 s)
CONNECTION_BOUND = 25.0
MARGIN = 10.0


def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if
    there is no such process in this PID namespace."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2:].split()[19]  # fields after "(comm)" start at field 3


def _host_identity() -> str:
    """This boot of this host and this PID namespace: two containers sharing a host name (a
    DaemonSet with hostNetwork during a surge), or a reboot, never see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: no identity, so nothing is ever reclaimed (the safe direction)
        return f"unknown-{os.getpid()}-{id(object())}"
    return f"{boot}/{pidns}"


def owner_prefix(node: str) -> str:
    """What every lease owner written by this node's processes in this boot and PID namespace of
    this host begins with; the process (pid and start time) and the thread follow
    (``node@host/boot/pidns:pid.start:thread``)."""
    return f"{node}@{socket.gethostname()}/{_host_identity()}:"


def owner(node: str) -> str:
    """This thread's lease owner name."""
    return f"{owner_prefix(node)}{os.getpid()}.{_proc_start(os.getpid())}:{threading.get_ident()}"


def dead_owner(owner: str, prefix: str) -> bool:
    """True when ``owner`` is a process of this node, in this boot and PID namespace of this host,
    that no longer runs (its pid is gone, or belongs to a process started at another time)."""
    if not owner.startswith(prefix):
        return False
    pid_text, _, start = owner[len(prefix):].split(":", 1)[0].partition(".")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid() or not start:
        return False
    return _proc_start(pid) != start


def fleet_ttl(order_timeout: float) -> float:
    """The lease TTL for a fleet whose orders end within ``order_timeout`` seconds."""
    return order_timeout + CONNECTION_BOUND + MARGIN


class _Leases(Protocol):
    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease: ...
    def renew(self, lease: Lease, ttl: float | None = None) -> Lease: ...
    def release(self, lease: Lease) -> None: ...


class FleetLock:
    """``lock()``/``check_lock()`` of :class:`~certd.store.pg.PgStore` with a short, kept-alive lease."""

    def __init__(self, leases: _Leases, bound: dict[str, Lease], node: str, ttl: float, clock: Clock) -> None:
        self._leases, self._bound, self._node = leases, bound, node
        self.ttl = ttl
        self._clock = clock
        self._mutex = threading.Lock()
        self._local: dict[str, threading.Lock] = {}

    def _mutex_of(self, name: str) -> threading.Lock:
        with self._mutex:
            return self._local.setdefault(name, threading.Lock())

    @contextmanager
    def local(self, name: str, timeout: float = -1) -> Iterator[None]:
        """This process's mutex of ``name`` (LockBusy after ``timeout`` seconds; -1: wait)."""
        mutex = self._mutex_of(name)
        if not mutex.acquire(timeout=timeout):
            raise LockBusy(f"{name}: busy in this process; try again when it has finished")
        try:
            yield
        finally:
            mutex.release()

    @contextmanager
    def held(self, name: str, timeout: float) -> Iterator[None]:
        """The fleet-wide lock of ``name`` for the block (the engine's ``lock()``). The lease is
        taken first, then this process's mutex: the apply loop (mutex only) never waits for a
        lease, so the two cannot deadlock, and the mutex is never held while waiting for one."""
        started = self._clock.monotonic()
        lease = self._leases.lease(name, owner(self._node), self.ttl, wait=timeout)
        stop = threading.Event()
        try:
            left = max(0.0, timeout - (self._clock.monotonic() - started))
            with self.local(name, left):
                self._bound[name] = lease
                keeper = threading.Thread(target=self._keep, args=(name, stop), name=f"certd-lease-{name}",
                                          daemon=True)
                keeper.start()
                try:
                    yield
                finally:
                    stop.set()
                    keeper.join()
                    lease = self._bound.pop(name, lease)
        finally:
            try:
                self._leases.release(lease)
            except StoreError as e:  # the database is gone: the lease lapses after its TTL
                event(log, "lease_release_failed", logging.WARNING, name=name, error=str(e))

    def check(self, name: str) -> None:
        """Prove the held lease of ``name`` (one round trip with its token) and extend it by
        the TTL; :class:`LeaseLost` if another node holds it now. No-op when not held."""
        lease = self._bound.get(name)
        if lease is not None:
            self._bound[name] = self._leases.renew(lease, self.ttl)

    def _keep(self, name: str, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 4):
            try:
                self.check(name)
            except LeaseLost as e:
                event(log, "lease_lost", logging.ERROR, name=name, error=str(e))
                return
            except StoreError as e:  # unreachable for now: try again at the next tick
                event(log, "lease_renew_failed", logging.WARNING, name=name, error=str(e))
