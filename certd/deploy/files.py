"""The deploy targets (``live_dir``, ``combined``, plain ``files``), on directory descriptors.

A deploy directory usually belongs to someone else (``www-data`` owns ``/etc/ssl/app``), who
can rename, replace or symlink any name in it at any moment. So every operation here opens
the deploy directory once and works relative to that descriptor (issue 12, docs/SECURITY.md):

- files are created with ``openat(O_CREAT|O_EXCL|O_NOFOLLOW)`` and their final mode from the
  first byte; an existing file's owner/mode is fixed with ``fchown``/``fchmod`` on a descriptor
  opened with ``O_NOFOLLOW`` (never ``chmod`` of a name: F2);
- renames are ``renameat``, hard links ``linkat`` without following a symlink (F4);
- deletions check ``(st_dev, st_ino)`` and walk trees by descriptor (:func:`fsutil.rmtree_at`);
- ``.NAME.versions`` must be a real directory owned by certd's user, else the target is
  refused with one line (F1): certd never prunes or zeroes what a symlink there leads to.

This module holds what the targets share (the Target protocol, wanted attributes, drift,
descriptor helpers); :mod:`certd.deploy.livedir` and :mod:`certd.deploy.plainfile` the two
kinds. See :mod:`certd.deploy.stage` for what stage/switch/prune mean.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from certd import fs as fsutil
from certd.core.errors import StoreError
from certd.core.model import Bundle, spki_sha256
from certd.crypto.keys import load_private_key

KEY_CONTENTS = ("privkey", "combined")


@dataclass(frozen=True)
class Want:
    data: bytes
    mode: int
    uid: int = -1   # -1: whoever certd runs as
    gid: int = -1   # -1: not managed

    def __repr__(self) -> str:  # data may be a key
        return f"Want(mode={self.mode:04o}, uid={self.uid}, gid={self.gid})"


def content_of(bundle: Bundle, content: str) -> bytes:
    return {"cert": bundle.cert_pem, "chain": bundle.chain_pem, "fullchain": bundle.fullchain_pem,
            "privkey": bundle.key_pem, "combined": bundle.combined_pem}[content]


def drift_of(path: Path, want: Want) -> list[str]:
    """What differs at ``path`` (read only; a symlink at the final name is reported, not followed)."""
    try:
        st = os.lstat(path)
        data = None
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        return [f"{path}: missing"]
    except OSError as e:
        return [f"{path}: cannot inspect: {e.strerror}"]
    if data is None:
        return [f"{path}: not a regular file"]
    problems = []
    if data != want.data:
        problems.append(f"{path}: content differs from the stored version")
    if stat.S_IMODE(st.st_mode) != want.mode:
        problems.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, expected {want.mode:04o}")
    uid = os.geteuid() if want.uid == -1 else want.uid
    if st.st_uid != uid:
        problems.append(f"{path}: owner {user_name(st.st_uid)}, expected {user_name(uid)}")
    if want.gid != -1 and st.st_gid != want.gid:
        problems.append(f"{path}: group {group_name(st.st_gid)}, expected {group_name(want.gid)}")
    return problems


def fix_attrs_at(dirfd: int, name: str, want: Want, shown: Path) -> None:
    """Bring owner and mode of an already staged file in line, through a descriptor opened
    without following a symlink (F2), never widening access to the wrong group: narrow first,
    then chown, then the final mode."""
    with fsutil.os_errors(shown, "set owner/mode of"):
        fd = fsutil.open_nofollow(dirfd, name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{shown} is not a regular file; certd does not change its owner or mode: remove it")
            mode = stat.S_IMODE(st.st_mode)
            want_uid = os.geteuid() if want.uid == -1 else want.uid
            uid = -1 if want_uid == st.st_uid else want_uid
            gid = -1 if want.gid in (-1, st.st_gid) else want.gid
            if uid != -1 or gid != -1:
                os.fchmod(fd, mode & want.mode)
                os.fchown(fd, uid, gid)
            if mode != want.mode or uid != -1 or gid != -1:
                os.fchmod(fd, want.mode)
        finally:
            os.close(fd)


def read_file_at(dirfd: int, name: str, shown: Path) -> bytes | None:
    try:
        return fsutil.read_at(dirfd, name)
    except OSError as e:
        raise fsutil.store_error(e, shown, "read") from e


@dataclass(frozen=True)
class KeyMatch:
    """Which private keys to destroy: by their PEM bytes (the store still holds them: the node that
    re-keyed), or by the SHA-256 of their public key's SubjectPublicKeyInfo (a fleet node whose
    store copy another node already destroyed: it knows the key only by its certificate's SPKI).
    A file matches when it contains one of the PEMs, or a PEM private key block whose public key
    has one of the SPKI hashes (``combined`` files hold certificates too: only key blocks count).
    Neither the key nor the file's content ever appears in an error or a log line."""

    pems: frozenset[bytes] = frozenset()
    spkis: frozenset[str] = frozenset()

    @classmethod
    def of(cls, pems: Collection[bytes] = (), spkis: Collection[str] = ()) -> KeyMatch:
        return cls(frozenset(k for k in pems if k), frozenset(s for s in spkis if s))

    def __bool__(self) -> bool:
        return bool(self.pems or self.spkis)

    def __repr__(self) -> str:  # pems are keys: never in a traceback or a log line
        return f"KeyMatch(pems=<{len(self.pems)} keys>, spkis={sorted(self.spkis)})"

    def found_in(self, data: bytes) -> bool:
        if any(k in data for k in self.pems):
            return True
        return bool(self.spkis) and any(s in self.spkis for s in key_spkis(data))


# A block's body is base64 and white space only: no "-" can extend a match past the next
# "-----" line, so a file of unmatched BEGIN lines costs linear time, not quadratic (the regex
# engine holds the GIL: a planted file of them froze every thread of the daemon). Encrypted
# blocks (Proc-Type / DEK-Info headers) do not match: they are not certd's copies.
_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----[A-Za-z0-9+/=\s]*-----END \1PRIVATE KEY-----")
#: the largest file searched for a key (certd's key and combined files are a few KB)
KEY_FILE_LIMIT = 1 << 20


def key_spkis(data: bytes) -> list[str]:
    """The SPKI SHA-256 of every readable unencrypted PEM private key in ``data`` (others skipped:
    an encrypted or foreign block, or one this library cannot load, is not certd's copy)."""
    found = []
    for m in _KEY_BLOCK.finditer(data):
        try:
            found.append(spki_sha256(load_private_key(m.group(0)).public_key()))
        except Exception:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm (a curve it lacks), ...
            continue
    return found


def holds_any_at(dirfd: int, name: str, keys: KeyMatch, shown: Path) -> bool:
    """Whether the regular file ``name`` (opened without following a symlink) holds one of ``keys``.
    StoreError for a file over :data:`KEY_FILE_LIMIT`: it is not searched, and the destruction
    that asked fails (tried again, reported) rather than count it as holding no key."""
    try:
        data = fsutil.read_at(dirfd, name, limit=KEY_FILE_LIMIT)
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise StoreError(f"{shown} is larger than any key file certd writes ({KEY_FILE_LIMIT:,} bytes): not "
                             "searched for the key to destroy; see who wrote it, remove it, and the next pass "
                             "finishes") from None
        raise fsutil.store_error(e, shown, "read") from e
    return data is not None and keys.found_in(data)


def inode_at(dirfd: int, name: str) -> tuple[int, int] | None:
    st = fsutil.lstat_at(dirfd, name)
    return None if st is None else (st.st_dev, st.st_ino)


@contextmanager
def deploy_dir(path: Path, *, create: bool) -> Iterator[int | None]:
    """A descriptor of the deploy directory (created if asked), None if it is missing."""
    if create:
        fsutil.ensure_dir(path, 0o755)
    elif not os.path.lexists(path):
        yield None
        return
    fd = fsutil.open_dir(path, nofollow=False)
    try:
        yield fd
    finally:
        os.close(fd)


# --- targets -------------------------------------------------------------------------------------

class Target(Protocol):
    def describe(self) -> str: ...
    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None: ...
    def is_staged(self, version: int) -> bool: ...
    def switch(self, version: int) -> None: ...
    def live_version(self) -> int | None: ...
    def prune(self, keep: set[int]) -> None: ...
    def check(self, version: int, bundle: Bundle) -> list[str]: ...
    def destroy_keys(self, keys: KeyMatch) -> list[Path]: ...


def vname(version: int) -> str:
    return f"{version:04d}"


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
