"""Leases and fencing tokens on a local directory (the :class:`~certd.store.port.Leases` contract).

Per certificate directory::

    lease.json   {"token": N, "owner": "...", "expires": <epoch s>, "flock": true}   0600
    lease.lock   flock()ed for the few microseconds of every lease operation and fenced write
    lock         flock()ed by the lease holder for the whole lease (as certd <= 0.x did)

``lease.json`` holds the newest token ever granted for the certificate; it is never removed
(a release only clears the owner), so tokens keep increasing across releases and restarts.
Every read-compare-write of it, and every fenced write (:meth:`FileLeases.fenced`), happens
under the ``lease.lock`` flock, so "is my token still the newest?" and the write are one step
for every process sharing the directory.

Why the holder also keeps ``lock`` flocked: the kernel drops a flock when its holder dies, so
a SIGKILLed certd frees the certificate at once instead of after its TTL (the behaviour users
have today), and a certd of the previous release, which only knows ``lock``, still excludes
and is excluded. A lease is therefore free when nobody holds ``lock`` (its holder released or
died) *or* when its TTL ran out by the clock (its holder stalled: the new owner takes over
without the flock, and the stalled one is fenced from then on).

Known limits: a lease taken over from a stalled holder has no flock, so if its new owner dies
the certificate stays busy until that lease's TTL; and a process stopped *inside* a fenced write
(it holds ``lease.lock`` for that write's few syscalls) makes the others wait until it resumes
or dies — the price of making the token check and the write one step on a plain filesystem.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from certd.core.clock import Clock
from certd.core.errors import LockBusy, StoreError
from certd import fs as fsutil
from certd.store import fileio
from certd.store.port import Fenced, Lease, LeaseLost

_POLL = 0.02  # seconds between attempts while waiting for a busy lease
LEASE_FILE = "lease.json"
GUARD_FILE = "lease.lock"
HOLD_FILE = "lock"


def _epoch(dt: datetime) -> float:
    return dt.timestamp()


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def open_lock(path: Path | str) -> int:
    with fsutil.os_errors(path, "open lock file"):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


@contextmanager
def flocked(path: Path | str, clock: Clock, timeout: float, busy: str) -> Iterator[None]:
    """An exclusive flock on ``path`` (made 0600), polled until ``timeout``; :class:`LockBusy`
    saying ``busy`` when another holder keeps it. Closing the descriptor releases it."""
    fd = open_lock(path)
    try:
        deadline = clock.monotonic() + timeout
        while not try_flock(fd, path):
            if clock.monotonic() >= deadline:
                raise LockBusy(busy)
            clock.sleep(_POLL)
        yield
    finally:
        os.close(fd)


def try_flock(fd: int, path: Path | str) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        raise fsutil.store_error(e, path, "lock") from e


def _free(rec: dict[str, Any], now: float, got_flock: bool) -> bool:
    """May a new lease be granted, given the record and whether we just got ``lock``?"""
    if rec.get("owner") is None:
        # Released (or never leased). Whoever still holds ``lock`` is a certd of the previous
        # release, a holder between its flock and its record, or a stalled holder whose
        # lease was taken over and released since: wait for it in every case.
        return got_flock
    if rec["expires"] <= now:
        return True  # its holder stalled past the TTL: take over; fencing stops the old one
    # Unexpired: free only if it was held by flock and the kernel dropped that (holder died).
    return got_flock and bool(rec.get("flock"))


class FileLeases:
    """Leases of the certificates under one store; ``cert_dir(name)`` makes and names the
    directory. Thread-safe: the descriptors holding ``lock`` are kept per granted token."""

    def __init__(self, cert_dir: Callable[[str], str], clock: Clock) -> None:
        self._cert_dir = cert_dir  # makes and names the directory, as a string (hot: no Path parsing)
        self._clock = clock
        self._holds: dict[tuple[str, int], int] = {}  # (name, token) -> fd holding ``lock``
        self._mutex = threading.Lock()

    # -- the record, always read and written under the guard ----------------------------------

    @contextmanager
    def _guard(self, name: str) -> Iterator[str]:
        d = self._cert_dir(name)
        fd = open_lock(f"{d}/{GUARD_FILE}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for microseconds, by live code only: no timeout
            yield d
        finally:
            os.close(fd)

    @staticmethod
    def _read(d: str) -> dict[str, Any]:
        path = f"{d}/{LEASE_FILE}"
        try:  # os.read, not Path.read_bytes: every fenced write reads it (20 a rotation; 5 us, not 20)
            raw = fileio.read(path, nofollow=True)
        except FileNotFoundError:
            return {"token": 0, "owner": None, "expires": 0.0, "flock": False}
        except OSError as e:
            if e.errno == errno.ELOOP:  # followed, a link would lend another record's token (or none)
                raise StoreError(f"{path} is a symbolic link; certd does not follow links in its state "
                                 f"directory: stop every certd using it and put the lease record itself "
                                 f"there (or remove the link)") from None
            raise fsutil.store_error(e, path, "read") from e
        try:
            rec = json.loads(raw)
            int(rec["token"]), float(rec["expires"])
            return dict(rec)
        except (ValueError, KeyError, TypeError):
            # Losing the counter could hand out a token again: refuse rather than guess.
            raise LeaseLost(f"{d}/{LEASE_FILE}: corrupt lease record; stop every certd using this state "
                            f"directory, then remove the file") from None

    @staticmethod
    def _write(d: str, rec: dict[str, Any], *, durable: bool = True) -> None:
        fsutil.atomic_write(f"{d}/{LEASE_FILE}", json.dumps(rec, sort_keys=True).encode() + b"\n", mode=0o600,
                            durable=durable)

    # -- the contract -------------------------------------------------------------------------

    def lease(self, name: str, owner: str, ttl: float, *, wait: float = 0.0) -> Lease:
        deadline = self._clock.monotonic() + wait
        while True:
            granted = self._try_lease(name, owner, ttl)
            if granted is not None:
                return granted
            if self._clock.monotonic() >= deadline:
                waited = f" after waiting {wait:g}s" if wait > 0 else ""
                raise LockBusy(f"{name}: another certd process is working on this certificate (lock "
                               f"{self._cert_dir(name)}/{HOLD_FILE} is held){waited}; try again when it has finished")
            self._clock.sleep(_POLL)

    def _try_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        d = self._cert_dir(name)
        hold = open_lock(f"{d}/{HOLD_FILE}")
        try:
            got_flock = try_flock(hold, f"{d}/{HOLD_FILE}")
            with self._guard(name):
                rec = self._read(d)
                now = _epoch(self._clock.now())
                if not _free(rec, now, got_flock):
                    return None
                token = int(rec["token"]) + 1
                expires = now + ttl
                # Not durable (the file is fsynced, its rename is not): a power loss may bring
                # the previous record back, and a token granted again after it fences nobody
                # wrongly, since every holder of this host's leases died with the power. The
                # rename becomes durable with the next fsync of this directory (the commit's).
                self._write(d, {"token": token, "owner": owner, "expires": expires, "flock": got_flock},
                            durable=False)
        except BaseException:
            os.close(hold)
            raise
        if got_flock:
            with self._mutex:
                self._holds[(name, token)] = hold
        else:
            os.close(hold)
        return Lease(name, owner, token, _dt(expires))

    def renew(self, lease: Lease, ttl: float) -> Lease:
        with self._guard(lease.name) as d:
            rec = self._read(d)
            if rec["token"] != lease.token or rec.get("owner") is None:
                raise LeaseLost(f"{lease.name}: lease {lease.token} of {lease.owner} was lost "
                                f"(now {rec['token']}, held by {rec.get('owner')})")
            rec["expires"] = _epoch(self._clock.now()) + ttl
            self._write(d, rec)
        return Lease(lease.name, lease.owner, lease.token, _dt(rec["expires"]))

    def release(self, lease: Lease) -> None:
        with self._mutex:
            fd = self._holds.pop((lease.name, lease.token), None)
        if fd is not None:
            # Held by flock: dropping it is the release. The record keeps naming this owner,
            # and lease() takes a record "flock": true whose ``lock`` nobody holds as free, as
            # it does after a crash; so no write and no fsync (every rotation ends here).
            os.close(fd)
            return
        with self._guard(lease.name) as d:  # taken over from a stalled holder: no flock to drop
            rec = self._read(d)
            if rec["token"] == lease.token and rec.get("owner") is not None:
                # Not durable: a release lost to a crash leaves an expiring record; fencing
                # holds meanwhile.
                self._write(d, {**rec, "owner": None, "expires": 0.0}, durable=False)

    def check(self, lease: Lease) -> None:
        with self._guard(lease.name) as d:
            rec = self._read(d)
        if rec["token"] != lease.token or rec.get("owner") is None:
            raise LeaseLost(f"{lease.name}: lease {lease.token} was taken over (token {rec['token']})")
        if rec["expires"] <= _epoch(self._clock.now()):
            raise LeaseLost(f"{lease.name}: lease {lease.token} expired at {_dt(rec['expires']).isoformat()}")

    @contextmanager
    def fenced(self, name: str, lease: Lease | None) -> Iterator[None]:
        """Run the block (one write) only while ``lease`` holds the newest token of ``name``;
        :class:`Fenced` otherwise. ``lease=None``: an unfenced write (the single-host adapter
        outside ``lock()``), still serialized with the fenced ones."""
        if lease is not None and lease.name != name:
            raise ValueError(f"a lease on {lease.name} cannot fence a write to {name}")
        with self._guard(name) as d:
            if lease is not None:
                newest = int(self._read(d)["token"])
                if newest != lease.token:
                    raise Fenced(f"{name}: write refused: lease token {lease.token} of {lease.owner} is stale "
                                 f"(token {newest} was granted since); another process took over")
            yield
