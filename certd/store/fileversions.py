"""Numbered versions and the desired pointer on a local directory (part of FileStore).

A version is written into a hidden ``.NNNN.tmp-*`` directory, every file fsynced, then renamed
to ``NNNN``: a version directory is complete or absent, never half-written. Leftovers of a
killed writer are removed (keys zeroed) by the next :meth:`VersionFiles.add_version`. The
desired version is the ``current`` symlink (``versions/NNNN``), replaced by one rename().
Every write here is fenced (:meth:`certd.store.filelease.FileLeases.fenced`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import re
import stat
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, ParamSpec, TypeVar

from certd.core.errors import StoreError
from certd.core.model import Bundle, CertInfo
from certd import fs as fsutil
from certd.store import fileio
from certd.store.fileio import INFO_KEY, NAME_RE, version_dirname
from certd.store.filekeys import KeyFiles, order_place, version_place
from certd.store.port import Lease, StoredVersion, VersionInfo

_CURRENT_RE = re.compile(r"versions/(\d+)/?")

P = ParamSpec("P")
R = TypeVar("R")

#: This process's writes, per certificate (see :meth:`VersionFiles.own_writes`): for each
#: ``certs`` directory (its real path, shared by every FileStore of this process on it), the
#: name -> the sequence number of the last write of that certificate's files.
_OWN_WRITES: dict[str, dict[str, int]] = {}
_SEQUENCE = itertools.count(1)


def writes(method: Callable[P, R]) -> Callable[P, R]:
    """Mark a store method that writes a certificate's files (its ``name`` argument's): once it
    returns, or fails part-way, :meth:`VersionFiles.own_writes` of that name has changed.
    tests/unit/test_store.py checks that every method of FileStore is either marked or known
    to write nothing of a certificate's."""
    position = list(inspect.signature(method).parameters).index("name")

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        finally:  # after the write (a bump before it would let a reader see the old files as new)
            name = kwargs["name"] if "name" in kwargs else args[position]
            args[0]._own_writes[name] = next(_SEQUENCE)  # type: ignore[attr-defined]

    wrapper.writes_a_certificate = True  # type: ignore[attr-defined]
    return wrapper


class VersionFiles:
    """Versions and ``current`` of the certificates under ``root/certs``."""

    root: Path
    _certs: str
    _dir_mode: int
    _key_mode: int
    _gid: int
    _keys: KeyFiles
    _own_writes: dict[str, int]

    def _count_own_writes(self) -> None:
        self._own_writes = _OWN_WRITES.setdefault(os.path.realpath(self._certs), {})

    def own_writes(self, name: str) -> int:
        """A number that changes whenever this process (any FileStore of it on this directory)
        has written ``name``'s files: a cache of what :meth:`change_token` covers may trust itself
        while it is unchanged, unless something else wrote the files (another process, a hand
        edit) — which only the change token sees, at five syscalls a certificate (issue 20: the
        daemon's whole status listing at 100,000 certificates)."""
        return self._own_writes.get(name, 0)

    def _fence(self, name: str, lease: Lease | None) -> AbstractContextManager[None]:
        raise NotImplementedError

    # -- paths -------------------------------------------------------------------------------

    def _cert_dir(self, name: str) -> Path:
        return Path(self._cert_path(name))

    def _cert_path(self, name: str) -> str:
        """``_cert_dir`` as a string: the read paths run per certificate (``status`` over
        thousands), and building Path objects cost more than the reads themselves."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid certificate name {name!r}")
        return f"{self._certs}/{name}"

    def _versions_dir(self, name: str) -> Path:
        return self._cert_dir(name) / "versions"

    def _version_dir(self, name: str, version: int) -> Path:
        return self._versions_dir(name) / version_dirname(version)

    def _ensure_cert_dir(self, name: str) -> Path:
        return Path(self._ensure_cert_path(name))

    def _ensure_cert_path(self, name: str) -> str:
        """:meth:`_ensure_cert_dir` as a string: every fenced write asks (20 a rotation), and
        parsing a Path each time cost more than the stat."""
        path = self._cert_path(name)
        try:  # the common case, in one stat: versions/ exists, so everything above it does
            if stat.S_ISDIR(os.stat(f"{path}/versions").st_mode):
                return path
        except OSError:
            pass
        d = self._cert_dir(name)
        fresh = not os.path.isdir(self._certs)
        for p in (self.root, self.root / "certs", d, d / "versions"):
            fsutil.ensure_dir(p, self._dir_mode, gid=self._gid)
        if fresh:
            self._created()
        return path

    def _created(self) -> None:
        """Called once when this store created the ``certs`` directory (a new state directory)."""

    # -- reading -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Certificates that have a directory in the store, sorted."""
        certs = self.root / "certs"
        try:
            entries = os.listdir(certs)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise fsutil.store_error(e, certs, "list") from e
        return sorted(n for n in entries if NAME_RE.fullmatch(n) and (certs / n).is_dir())

    def versions(self, name: str) -> list[int]:
        """Complete versions, ascending (hidden temporary directories are not versions)."""
        vdir = self._versions_dir(name)
        try:
            entries = os.listdir(vdir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise fsutil.store_error(e, vdir, "list") from e
        return sorted(int(n) for n in entries if n.isdigit() and n.isascii())

    def desired(self, name: str) -> int | None:
        """The version every node should serve: where ``current`` points."""
        link = f"{self._cert_path(name)}/current"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise fsutil.store_error(e, link, "read") from e
        m = _CURRENT_RE.fullmatch(target)
        if not m:
            raise StoreError(f"{link} points at {target!r}, not versions/NNNN; point it at an existing version "
                             f"or remove it")
        return int(m.group(1))

    current = desired  # the single-host name (certd.store.port.Store)

    def load(self, name: str, version: int) -> StoredVersion:
        vdir = f"{self._cert_path(name)}/versions/{version_dirname(version)}"
        try:
            meta = fileio.read_json(f"{vdir}/meta.json", what="version metadata")
        except StoreError:
            if not os.path.isdir(vdir):
                raise StoreError(f"{name}: version {version} is not in the store ({vdir} is missing)") from None
            raise
        if not isinstance(meta, dict):
            raise StoreError(f"{vdir}/meta.json: corrupt (not a JSON object); restore it or remove version {version}")
        parts = {}
        for f in ("cert.pem", "chain.pem"):
            try:
                parts[f] = fileio.read(f"{vdir}/{f}")
            except FileNotFoundError:
                raise StoreError(f"{name}: version {version} is corrupt: {vdir}/{f} is missing") from None
            except OSError as e:
                raise fsutil.store_error(e, f"{vdir}/{f}", "read") from e
        key = self._keys.read(version_place(self._cert_path(name), name, version), f"{name}: version {version}")
        if key is None and not meta.get("key_destroyed"):
            raise StoreError(f"{name}: version {version} is corrupt: {vdir}/privkey.pem is missing")
        parts["privkey.pem"] = key or b""
        if b"-----BEGIN CERTIFICATE-----" not in parts["cert.pem"]:
            raise StoreError(f"{name}: version {version} is corrupt: {vdir}/cert.pem holds no PEM certificate")
        if parts["privkey.pem"] and b"PRIVATE KEY-----" not in parts["privkey.pem"]:
            raise StoreError(f"{name}: version {version} is corrupt: {vdir}/privkey.pem holds no PEM private key")
        bundle = Bundle(parts["cert.pem"], parts["chain.pem"], parts["privkey.pem"])
        info = fileio.stored_info(meta.pop(INFO_KEY, None), parts["cert.pem"])
        return StoredVersion(name, version, bundle.with_info(info) if info is not None else bundle, meta)

    def load_info(self, name: str, version: int) -> VersionInfo:
        """A version's CertInfo and meta from meta.json alone (1 file instead of 4, no hashing:
        ``status`` and the daemon's scheduling read this for every certificate). Versions
        written before meta.json recorded the CertInfo are loaded in full."""
        path = f"{self._cert_path(name)}/versions/{version_dirname(version)}/meta.json"
        try:
            meta = fileio.read_json(path, what="version metadata")
        except StoreError:
            sv = self.load(name, version)  # the usual error for a missing or broken version
            return VersionInfo(name, version, sv.info, sv.meta)
        raw = meta.pop(INFO_KEY, None) if isinstance(meta, dict) else None
        try:
            return VersionInfo(name, version, CertInfo.from_json(raw), meta)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, AttributeError):
            sv = self.load(name, version)
            return VersionInfo(name, version, sv.info, sv.meta)

    # -- writing (fenced) --------------------------------------------------------------------

    @writes
    def add_version(self, name: str, bundle: Bundle, meta: dict[str, Any], *, lease: Lease | None = None) -> int:
        """Store ``bundle`` as the next version number (written and fsynced; not made desired).
        The files are written before the fence is checked; only the publishing rename is fenced."""
        if not bundle.cert_pem or not bundle.key_pem:
            raise ValueError("a stored version needs a certificate and its private key")
        meta_bytes = _meta_bytes(bundle, meta)
        self._ensure_cert_dir(name)
        vroot = self._versions_dir(name)
        fsutil.remove_stale_temps(vroot)
        version = max(self.versions(name), default=0) + 1
        with fsutil.TempDir(vroot, version_dirname(version), mode=self._dir_mode, gid=self._gid) as tmp:
            self._write_public(tmp, bundle, meta_bytes)
            key_name = self._write_key(tmp, name, version, bundle.key_pem)
            with self._fence(name, lease):
                while not tmp.publish(vroot / version_dirname(version)):
                    version += 1  # someone published this number meanwhile (an unfenced writer)
                    if self._keys.sealing:  # sealed for the number it was going to have: seal again
                        tmp.remove(key_name)
                        self._write_key(tmp, name, version, bundle.key_pem)
        return version

    @writes
    def restore_version(self, name: str, version: int, bundle: Bundle, meta: dict[str, Any], *,
                        lease: Lease | None = None) -> None:
        """Store ``bundle`` as version number ``version`` exactly (a backup being restored keeps
        its numbers, so rollback targets and the audit trail still agree); written, sealed and
        published like :meth:`add_version`. :class:`StoreError` if that number is already taken.
        A version recorded ``key_destroyed`` comes without its key, as it was."""
        if version < 1:
            raise ValueError(f"version numbers start at 1, not {version}")
        if not bundle.cert_pem or (not bundle.key_pem and not meta.get("key_destroyed")):
            raise ValueError("a stored version needs a certificate and its private key")
        meta_bytes = _meta_bytes(bundle, meta)
        self._ensure_cert_dir(name)
        vroot = self._versions_dir(name)
        fsutil.remove_stale_temps(vroot)
        final = vroot / version_dirname(version)
        with fsutil.TempDir(vroot, final.name, mode=self._dir_mode, gid=self._gid) as tmp:
            self._write_public(tmp, bundle, meta_bytes)
            if bundle.key_pem:
                self._write_key(tmp, name, version, bundle.key_pem)
            with self._fence(name, lease):
                if not tmp.publish(final):
                    raise StoreError(f"{name}: version {version} is already in the store ({final}); not overwritten")

    @staticmethod
    def _write_public(tmp: fsutil.TempDir, bundle: Bundle, meta_bytes: bytes) -> None:
        for fname, data in (("cert.pem", bundle.cert_pem), ("chain.pem", bundle.chain_pem),
                            ("fullchain.pem", bundle.fullchain_pem), ("meta.json", meta_bytes)):
            tmp.write(fname, data, mode=0o644)

    def _write_key(self, tmp: fsutil.TempDir, name: str, version: int, key_pem: bytes) -> str:
        fname, data, sealed = self._keys.encode(version_place(self._cert_path(name), name, version), key_pem)
        if sealed:
            tmp.write(fname, data, mode=0o600)
        elif not self._linked_order_key(tmp, name, fname, key_pem):
            tmp.write(fname, data, mode=self._key_mode, gid=self._gid)
        return fname

    def _linked_order_key(self, tmp: fsutil.TempDir, name: str, fname: str, key_pem: bytes) -> bool:
        """Link the order journal's key into the version when it is this very key, plain, and
        already has the version key's mode and owner (no ``key_group``): those bytes were
        fsynced before the order was finalized, so the version's key costs no second write,
        no second fsync, and no copy to zero when the journal is cleared (its name is only
        unlinked). False: write the key as usual."""
        if self._key_mode != 0o600 or self._gid != -1:
            return False
        path = order_place(self._cert_path(name), name).path(False)
        try:
            if fileio.read(path) != key_pem:
                return False
            tmp.link(fname, path)
        except OSError:
            return False
        return True

    @writes
    def update_meta(self, name: str, version: int, changes: dict[str, Any], *, lease: Lease | None = None) -> None:
        """Merge ``changes`` into a version's meta.json (e.g. ``key_compromised``), atomically."""
        path = self._version_dir(name, version) / "meta.json"
        self.load(name, version)  # a complete version, or StoreError
        with self._fence(name, lease):
            meta = fileio.read_json(path, what="version metadata")  # with the recorded CertInfo
            meta.update(changes)
            fsutil.atomic_write(path, fileio.meta_bytes(meta), mode=0o644)

    @writes
    def set_desired(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        """Point ``current`` at ``version`` with one rename()."""
        vdir = self._version_dir(name, version)
        if not (vdir / "cert.pem").is_file():
            raise StoreError(f"{name}: cannot make version {version} current: it is not in the store ({vdir})")
        if not self._keys.exists(version_place(self._cert_path(name), name, version)):
            raise StoreError(f"{name}: cannot make version {version} current: its private key was destroyed")
        with self._fence(name, lease):
            fsutil.atomic_symlink(f"versions/{version_dirname(version)}", self._cert_dir(name) / "current")

    @writes
    def prune(self, name: str, keep: int, protect: Collection[int] = (), *, lease: Lease | None = None) -> list[int]:
        """Remove the oldest versions until ``keep`` remain, never the desired or a protected
        one (so more may remain). Keys are zeroed before unlinking. Returns the removed ones."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        vroot = self._versions_dir(name)
        fsutil.remove_stale_temps(vroot)
        removed: list[int] = []
        with self._fence(name, lease):
            versions = self.versions(name)
            spare = {self.desired(name), *protect}
            excess = len(versions) - keep
            for v in _oldest_first(versions, spare):
                if excess <= 0:
                    break
                fsutil.hide_and_remove(vroot / version_dirname(v))
                removed.append(v)
                excess -= 1
        return removed

    @writes
    def destroy_key(self, name: str, version: int, *, lease: Lease | None = None) -> None:
        """Zero and remove one version's private key (after keyCompromise); the certificate and
        meta stay for the record, with ``key_destroyed: true``."""
        vdir = self._version_dir(name, version)
        if not vdir.is_dir():
            raise StoreError(f"{name}: version {version} is not in the store ({vdir} is missing)")
        self.update_meta(name, version, {"key_destroyed": True}, lease=lease)
        with self._fence(name, lease):
            self._keys.destroy(version_place(self._cert_path(name), name, version))


def _meta_bytes(bundle: Bundle, meta: dict[str, Any]) -> bytes:
    """meta.json: ``meta`` with the leaf's CertInfo recorded (see :func:`fileio.stored_info`)."""
    info = {**bundle.info.to_json(), "pem_sha256": fileio.sha256(bundle.cert_pem)}
    return fileio.meta_bytes({**meta, INFO_KEY: info})


def _oldest_first(versions: list[int], spare: Collection[int | None]) -> Iterator[int]:
    return (v for v in versions if v not in spare)
