"""Private keys at rest in a FileStore: plain PEM, or sealed under the KEK (certd.crypto.custody).

Each key has a plain name and a sealed name in its directory; at most one of them should
exist, and when both do (a crash while sealing) the sealed one wins::

    certs/<name>/versions/NNNN/privkey.pem | privkey.sealed      slot version/<name>/<N>
    certs/<name>/order.key | order.sealed                         slot order/<name>
    accounts/<id>/key.pem | key.sealed                            slot account/<id>

Adding ``[keys]`` to a state directory seals what is there (:meth:`KeyFiles.seal_existing`,
resumable: every key is sealed, fsynced, then its plain file zeroed and removed), marked done
by ``keys.sealed``. A KEK rotation (:meth:`KeyFiles.rewrap_all`) records itself first in
``kek-rotation.json`` (certd.store.kekrecord); every process using the store picks the record
up (one ``stat`` per key operation) and from then on seals under the new KEK and opens keys
wrapped under it, so a running daemon needs no restart and no key is wrapped under the old KEK
behind the rotation's back.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certd.core.errors import LockBusy
from certd.crypto.custody import CustodyError, FileKek, Kek, KeyRing, sealed_kek
from certd import fs as fsutil
from certd.store import fileio, kekrecord

Guard = Callable[[str | None, float], AbstractContextManager[None]]  # (certificate, seconds to wait)

#: Sealing at start-up waits this long for a certificate's lock (a rotation in flight): a daemon
#: must become ready well within systemd's start timeout; a busy certificate waits for the next pass.
SEAL_WAIT = 5.0
#: A KEK rotation (an operator waiting for it) waits this long per certificate.
REWRAP_WAIT = 900.0


def _unguarded(name: str | None, wait: float) -> AbstractContextManager[None]:
    return nullcontext()


log = logging.getLogger("certd.store")

MARKER = "keys.sealed"
SEALED_MODE = 0o600  # a sealed key is useless without the KEK; still nobody else's business


@dataclass(frozen=True)
class KeyPlace:
    """Where one private key lives: its directory, its two possible file names, its slot."""

    directory: str
    plain: str
    sealed: str
    slot: str

    def path(self, sealed: bool) -> str:
        return f"{self.directory}/{self.sealed if sealed else self.plain}"


def version_place(cert_path: str, name: str, version: int) -> KeyPlace:
    return KeyPlace(f"{cert_path}/versions/{fileio.version_dirname(version)}", "privkey.pem", "privkey.sealed",
                    f"version/{name}/{version}")


def order_place(cert_path: str, name: str) -> KeyPlace:
    return KeyPlace(cert_path, "order.key", "order.sealed", f"order/{name}")


def account_place(account_dir: str) -> KeyPlace:
    return KeyPlace(account_dir, "key.pem", "key.sealed", f"account/{os.path.basename(account_dir)}")


class KeyFiles:
    """Reads and writes keys for a FileStore; ``ring`` None keeps them in plain text (no ``[keys]``)."""

    def __init__(self, root: Path, ring: KeyRing | None, loader: Callable[[str], Kek] | None = None,
                 guard: Guard = _unguarded) -> None:
        self.root = root
        self._guard = guard
        self._base = ring
        self._ring = ring
        self._loader = loader or (lambda source: FileKek.load(Path(source)))
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def reconfigure(self, ring: KeyRing | None, loader: Callable[[str], Kek] | None = None) -> None:
        """Seal and open with ``ring`` from now on (``[keys]`` changed by a config reload).
        :class:`CustodyError`, nothing changed, when ``ring`` could not open keys sealed under
        the KEK in use now (``[keys]`` removed, or ``kek_file`` changed without a rotation)."""
        current = self.ring
        if current is not None:
            if ring is None:
                raise CustodyError(f"removing [keys] would leave the stored keys sealed under KEK "
                                   f"{current.current.kek_id} unopenable; keep [keys] (keys cannot be unsealed in "
                                   f"place)")
            candidate = kekrecord.extend(ring, kekrecord.load(self.root), loader or self._loader, self.root)
            if current.current.kek_id not in candidate.kek_ids:
                raise CustodyError(f"the new [keys] does not accept KEK {current.current.kek_id}, under which stored "
                                   f"keys are sealed: keep its file in old_kek_files, or move the keys first with "
                                   f"`certd kek rotate --new ...`")
        with self._lock:
            self._base, self._ring, self._seen = ring, ring, None
            if loader is not None:
                self._loader = loader

    @property
    def sealing(self) -> bool:
        return self._base is not None

    @property
    def configured(self) -> KeyRing | None:
        """The ring as configured, without the rotations recorded in the state directory."""
        return self._base

    @property
    def ring(self) -> KeyRing | None:
        """The configured ring extended by ``kek-rotation.json`` (certd.store.kekrecord): it
        opens keys under every KEK a rotation moved them to and seals under the newest."""
        if self._base is None:
            return None
        seen = fileio.identity(f"{self.root}/{kekrecord.ROTATION}")
        with self._lock:
            if seen != self._seen:
                targets = kekrecord.load(self.root) if seen is not None else []
                self._ring = kekrecord.extend(self._base, targets, self._loader, self.root / kekrecord.ROTATION)
                self._seen = seen
            return self._ring

    def rotation(self) -> dict[str, Any] | None:
        """The newest KEK rotation (``kek``, ``source``, ``from``, ``started``, ``finished``), if any."""
        targets = kekrecord.load(self.root)
        return targets[-1] if targets else None

    def begin_rotation(self, kek: Kek, source: str, started: str) -> KeyRing:
        """Record the rotation to ``kek`` (before any key is re-wrapped, so every process seals
        under it from now on); returns the ring sealing under it."""
        ring = self.ring
        if ring is None:
            raise CustodyError("no [keys] section: keys are stored unencrypted, there is no KEK to rotate; add [keys] "
                               "with kek_file (see `certd kek init`) first")
        kekrecord.begin(self.root, kek, source, ring.current.kek_id, started)
        ring = self.ring
        assert ring is not None and ring.current.kek_id == kek.kek_id
        return ring

    def finish_rotation(self, rewrapped: int, finished: str) -> dict[str, Any]:
        return kekrecord.finish(self.root, rewrapped, finished)

    # -- one key -----------------------------------------------------------------------------

    def encode(self, place: KeyPlace, key_pem: bytes) -> tuple[str, bytes, bool]:
        """(file name, bytes, sealed?) to write for ``key_pem`` at ``place``."""
        ring = self.ring
        if ring is None:
            return place.plain, key_pem, False
        return place.sealed, ring.seal(key_pem, place.slot), True

    def read(self, place: KeyPlace, where: str) -> bytes | None:
        """The plain key at ``place`` (opened if sealed); None if there is none."""
        for sealed in (True, False):
            path = place.path(sealed)
            try:
                data = fileio.read(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise fsutil.store_error(e, path, "read") from e
            if not sealed:
                return data
            return self.open(data, place, where)
        return None

    def open(self, data: bytes, place: KeyPlace, where: str) -> bytes:
        ring = self.ring
        if ring is None:
            raise CustodyError(f"{where}: the private key is sealed under KEK {sealed_kek(data) or '?'}, and no [keys] "
                               f"section is configured; add [keys] with that KEK (kek_file = ...) to use it")
        return ring.open(data, place.slot, where)

    def exists(self, place: KeyPlace) -> bool:
        return any(os.path.isfile(place.path(s)) for s in (True, False))

    def write(self, place: KeyPlace, key_pem: bytes, *, mode: int = 0o600, gid: int = -1,
              durable: bool = True, lazy: bool = False) -> None:
        """Atomically replace the key at ``place`` (the other form, if any, is zeroed and removed).
        ``durable=False``: the file is fsynced, its directory is left to the caller; ``lazy``:
        no fsync at all (survives a SIGKILL, not a power loss)."""
        fname, data, sealed = self.encode(place, key_pem)
        fsutil.atomic_write(f"{place.directory}/{fname}", data, mode=SEALED_MODE if sealed else mode,
                            gid=-1 if sealed else gid, durable=durable, lazy=lazy)
        other = place.path(not sealed)
        if os.path.lexists(other):
            fsutil.secure_delete(other)

    def destroy(self, place: KeyPlace, *, durable: bool = True) -> None:
        """Zero and remove both forms, and any temporary copy a killed writer left (for a sealed
        key this wipes its only wrapped data key). ``durable=False``: the zeroing is fsynced,
        the removals are left for the caller's directory fsync."""
        for sealed in (True, False):
            fsutil.secure_delete(place.path(sealed), durable=durable)
        leftovers = (f".{place.sealed}{fsutil.TMP_INFIX}", f".{place.plain}{fsutil.TMP_INFIX}")
        try:
            names = os.listdir(place.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(leftovers):
                fsutil.secure_delete(f"{place.directory}/{name}")

    # -- every key ---------------------------------------------------------------------------

    def places(self) -> Iterator[KeyPlace]:
        for _, places in self.groups():
            yield from places

    def groups(self) -> Iterator[tuple[str | None, list[KeyPlace]]]:
        """Every key place, by the certificate it belongs to (None: the ACME accounts)."""
        certs = self.root / "certs"
        for name in _listdir(certs):
            if not fileio.NAME_RE.fullmatch(name):
                continue
            cert_path = f"{certs}/{name}"
            yield name, [order_place(cert_path, name), *(version_place(cert_path, name, int(v))
                         for v in _listdir(Path(cert_path) / "versions") if v.isdigit() and v.isascii())]
        accounts = self.root / "accounts"
        yield None, [account_place(f"{accounts}/{a}") for a in _listdir(accounts) if os.path.isdir(accounts / a)]

    def seal_existing(self, *, full_scan: bool = False) -> list[str]:
        """Seal every plain key (each fsynced before its plain file is zeroed and removed), each
        certificate under its ``guard`` (its lock; one busy past the guard's wait is left for
        the next pass), and mark the directory done; resumable. ``full_scan`` looks again even
        when marked done. Returns the slots sealed now. Without ``[keys]``, drops the mark
        instead (keys written from now on are plain, and a later ``[keys]`` must look again)."""
        marker = self.root / MARKER
        if not self.sealing:
            if os.path.lexists(marker):
                fileio.remove(marker)
            return []
        if os.path.lexists(marker) and not full_scan:
            return []
        sealed: list[str] = []
        busy = False
        for name, places in self.groups():
            todo = [p for p in places if os.path.isfile(p.path(False))]
            if todo:
                try:
                    with self._guard(name, SEAL_WAIT):
                        sealed += [p.slot for p in todo if self._seal_one(p)]
                except LockBusy:
                    busy = True
                    log.warning("keys of %s not sealed yet: a rotation holds its lock; the next pass seals them", name)
        if self.root.is_dir() and not busy:
            fsutil.atomic_write(marker, fileio.json_bytes({"sealed": len(sealed)}), mode=0o600)
        return sealed

    def _seal_one(self, place: KeyPlace) -> bool:
        plain = place.path(False)
        try:
            key_pem = fileio.read(plain)
        except FileNotFoundError:
            return False  # pruned meanwhile
        if not self._sealed_holds(place, key_pem):  # else a crash came between sealing and removing
            fname, data, _ = self.encode(place, key_pem)
            fsutil.atomic_write(f"{place.directory}/{fname}", data, mode=SEALED_MODE)
        fsutil.secure_delete(plain)
        return True

    def _sealed_holds(self, place: KeyPlace, key_pem: bytes) -> bool:
        """Whether the sealed file beside a plain key opens (under the ring in use) to that very key."""
        try:
            data = fileio.read(place.path(True))
        except FileNotFoundError:
            return False
        try:
            return self.open(data, place, place.path(True)) == key_pem
        except CustodyError:
            return False

    def rewrap_all(self) -> int:
        """Re-wrap every sealed key's data key under the current KEK (the ciphertext is kept),
        each file replaced atomically under the certificate's ``guard`` (so a key destroyed
        meanwhile is not brought back); passes repeat until one finds nothing left (a key sealed
        by another process before it saw the rotation). A key that cannot be opened (corrupt, or
        under a KEK nobody has) is logged and left where it is: ``census`` reports it. Returns
        how many keys were re-wrapped."""
        total = 0
        failed: set[str] = set()
        for _ in range(5):
            ring = self.ring
            assert ring is not None
            done = 0
            for name, places in self.groups():
                stale = [p for p in places if p.path(True) not in failed and self._stale(p, ring)]
                if stale:
                    with self._guard(name, REWRAP_WAIT):
                        done += sum(self._rewrap_one(p, ring, failed) for p in stale)
            total += done
            if done == 0:
                return total
        raise CustodyError("keys keep appearing under the old KEK during the rotation; run `certd kek rotate` again")

    @staticmethod
    def _stale(place: KeyPlace, ring: KeyRing) -> bool:
        try:
            data = fileio.read(place.path(True))
        except FileNotFoundError:
            return False
        return sealed_kek(data) != ring.current.kek_id

    @staticmethod
    def _rewrap_one(place: KeyPlace, ring: KeyRing, failed: set[str]) -> bool:
        path = place.path(True)
        try:
            data = fileio.read(path)
        except FileNotFoundError:
            return False  # destroyed or pruned before we got the lock
        try:
            fresh = ring.rewrap(data, place.slot, where=path)
        except CustodyError as e:
            failed.add(path)
            log.warning("not re-wrapped: %s", e)
            return False
        if fresh is None:
            return False
        fsutil.atomic_write(path, fresh, mode=SEALED_MODE)
        return True

    def census(self) -> dict[str, int]:
        """How many stored keys are plain, and how many are sealed under each KEK id."""
        counts: dict[str, int] = {}
        for place in self.places():
            for sealed in (True, False):
                try:
                    data = fileio.read(place.path(sealed))
                except FileNotFoundError:
                    continue
                kind = (sealed_kek(data) or "corrupt") if sealed else "plain"
                counts[kind] = counts.get(kind, 0) + 1
                break
        return counts


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise fsutil.store_error(e, path, "list") from e
