"""Directory descriptors opened without following symlinks, and the *at() reads on them.

See :mod:`certd.fs` for the rules."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certd.core.errors import StoreError
from certd.fs.oserrors import store_error
from certd.fs.sync import fsync

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_dir(path: Path | str, *, nofollow: bool = True) -> int:
    """A descriptor of the directory ``path`` (the final component must not be a symlink unless
    ``nofollow=False``); StoreError otherwise. Close it with ``os.close``."""
    flags = DIR_FLAGS | (os.O_NOFOLLOW if nofollow else 0)
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{path} is not a directory (a symlink or a file); certd does not follow it: "
                             f"make it a real directory") from e
        raise store_error(e, path, "open directory") from e


@contextmanager
def dir_fd(path: Path | str, *, nofollow: bool = True) -> Iterator[int]:
    """``with dir_fd(path) as fd:`` — :func:`open_dir`, closed at the end of the block."""
    fd = open_dir(path, nofollow=nofollow)
    try:
        yield fd
    finally:
        os.close(fd)


def open_dir_at(dirfd: int, name: str, shown: Path | str) -> int:
    """Open the subdirectory ``name`` of ``dirfd`` without following a symlink."""
    try:
        return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{shown} is not a directory (a symlink or a file); certd does not follow it: "
                             f"remove it") from e
        raise store_error(e, shown, "open directory") from e


def _user(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def open_own_dir(dirfd: int, name: str, shown: Path | str, *, create_mode: int | None = None) -> int:
    """A descriptor of ``name`` in ``dirfd``, which must be a real directory owned by certd's
    effective user (created with ``create_mode`` if absent and a mode is given). Anything else —
    a symlink, a file, someone else's directory — is refused with one line: certd would
    otherwise delete and zero what that thing leads to."""
    created = False
    if create_mode is not None:
        try:
            os.mkdir(name, create_mode & 0o700, dir_fd=dirfd)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise store_error(e, shown, "create directory") from e
    try:
        fd = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{shown} is not a real directory (a symlink or a file); certd refuses to use it: "
                             f"remove it and certd recreates it") from e
        raise store_error(e, shown, "open directory") from e
    st = os.fstat(fd)  # the directory we hold, whatever the name points at by now
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise StoreError(f"{shown} is owned by {_user(st.st_uid)}, not by certd's user {_user(os.geteuid())}; "
                         f"certd refuses to use it: remove it and certd recreates it")
    if created:
        try:
            os.fchmod(fd, create_mode)  # type: ignore[arg-type]
            fsync(dirfd)
        except OSError as e:
            os.close(fd)
            raise store_error(e, shown, "create directory") from e
    return fd


def open_nofollow(dirfd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """``openat(dirfd, name, flags | O_NOFOLLOW | O_NONBLOCK)``: a symlink is ELOOP, a FIFO does not block."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)


def read_at(dirfd: int, name: str, limit: int | None = None) -> bytes | None:
    """The bytes of the regular file ``name`` in ``dirfd``; None if missing, a symlink or not a
    regular file (never followed, never blocks on a FIFO). With ``limit``, OSError(EFBIG) for a
    file of more bytes (checked on the open file, and while reading: it may grow meanwhile)."""
    try:
        fd = open_nofollow(dirfd, name)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if limit is not None and max(size, st.st_size) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def inode_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def fsync_fd(dirfd: int, shown: Path | str) -> None:
    try:
        fsync(dirfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise store_error(e, shown, "fsync directory") from e


def identity(path: Path | str) -> tuple[int, int, int]:
    """(inode, mtime in ns, size) of ``path``: changes whenever the file is rewritten or
    replaced by rename(), so caches of what it holds can be keyed by it. OSError if absent."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size
