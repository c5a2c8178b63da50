"""Deleting by descriptor: files wiped before unlink, trees walked by descriptor, a killed
process's temporaries swept (skipping any still flocked by a writer).

See :mod:`certd.fs` for the rules."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from certd.core.errors import StoreError
from certd.fs.oserrors import TMP_INFIX, store_error, temp_name
from certd.fs.sync import fsync
from certd.fs.descriptors import DIR_FLAGS, inode_key, dir_fd, fsync_fd, lstat_at, open_dir, open_nofollow

ZEROS = bytes(64 * 1024)


def zero_fd(fd: int) -> None:
    """Overwrite the file's bytes in place with zeros and fsync (best effort on CoW/flash)."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, ZEROS[: min(len(ZEROS), size - offset)], offset)
    fsync(fd)


def _wipe_fd(fd: int) -> None:
    """Zero a regular file that has no other name (best effort)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        zero_fd(fd)


def _open_for_wipe(dirfd: int, name: str) -> int:
    """A writable descriptor of ``name`` (never following a symlink), or -1 if it is not a regular
    file of ours. A read-only file certd owns is made writable through its descriptor (fchmod),
    then reopened through /proc/self/fd: no path is ever chmod-ed."""
    try:
        return open_nofollow(dirfd, name, os.O_WRONLY)
    except PermissionError:
        pass
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOENT, errno.ETXTBSY):
            return -1
        raise
    try:
        ro = open_nofollow(dirfd, name)
    except OSError:
        return -1
    try:
        st = os.fstat(ro)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return -1
        os.fchmod(ro, 0o600)
        return os.open(f"/proc/self/fd/{ro}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    finally:
        os.close(ro)


def delete_at(dirfd: int, name: str, expected: tuple[int, int] | None = None, *,
              shown: Path | str | None = None) -> bool:
    """Remove ``name`` from ``dirfd``: a regular file is zeroed first (unless it has other hard
    links), a directory is removed with :func:`rmtree_at`, a symlink is unlinked, never followed.
    With ``expected=(st_dev, st_ino)``, an entry that is no longer that inode is left alone and
    False is returned. Missing is fine (False). No directory fsync: the caller does it once."""
    shown = shown or name
    try:
        st = lstat_at(dirfd, name)
        if st is None:
            return False
        if expected is not None and inode_key(st) != expected:
            return False
        if stat.S_ISDIR(st.st_mode):
            return rmtree_at(dirfd, name, expected=inode_key(st), shown=shown)
        fd = _open_for_wipe(dirfd, name) if stat.S_ISREG(st.st_mode) else -1
        try:
            if fd >= 0:
                if inode_key(os.fstat(fd)) != inode_key(st):
                    return False  # swapped since the lstat: not what we meant to delete
                _wipe_fd(fd)
            os.unlink(name, dir_fd=dirfd)
        finally:
            if fd >= 0:
                os.close(fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise store_error(e, shown, "delete") from e
    return True


def rmtree_at(dirfd: int, name: str, expected: tuple[int, int] | None = None, *,
              shown: Path | str | None = None) -> bool:
    """Remove the directory ``name`` in ``dirfd`` and everything under it, walking by descriptor:
    each subdirectory is opened with ``O_NOFOLLOW`` relative to its parent's descriptor, so a
    subdirectory swapped for a symlink mid-walk is only unlinked, never followed. Regular files
    are zeroed first. A symlink at ``name`` itself is unlinked. False if ``name`` was missing
    or (with ``expected``) is no longer that inode."""
    shown = shown or name
    try:
        try:
            sub = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a symlink or a file
                st = lstat_at(dirfd, name)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    os.unlink(name, dir_fd=dirfd)  # dropping a symlink never touches its target
                    return True
                return delete_at(dirfd, name, expected, shown=shown)
            raise
        try:
            if expected is not None and inode_key(os.fstat(sub)) != expected:
                return False
            for entry in os.listdir(sub):
                st = lstat_at(sub, entry)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    rmtree_at(sub, entry, expected=inode_key(st), shown=f"{shown}/{entry}")
                else:
                    delete_at(sub, entry, expected=inode_key(st), shown=f"{shown}/{entry}")
        finally:
            os.close(sub)
        try:
            os.rmdir(name, dir_fd=dirfd)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False  # swapped for something else after the walk: not ours to remove
    except StoreError:
        raise
    except OSError as e:
        raise store_error(e, shown, "delete") from e
    return True


def secure_delete(path: Path | str, *, durable: bool = True) -> None:
    """Overwrite a private key's bytes with zeros, fsync, unlink; missing is fine.
    ``durable=False`` leaves out the directory fsync (the caller makes the unlink durable).

    A file with other hard links (a deployed copy sharing the inode) is only unlinked: zeroing
    it would destroy the file still in use under its other name. A symlink is unlinked, never
    followed. Overwriting is best effort on copy-on-write filesystems and flash. Works by
    descriptor (:func:`delete_at`): no path is chmod-ed or followed.
    """
    path = Path(path)
    try:
        d = open_dir(path.parent, nofollow=False)
    except StoreError:
        if not os.path.lexists(path.parent):
            return
        raise
    try:
        if delete_at(d, path.name, shown=path) and durable:
            fsync_fd(d, path.parent)
    finally:
        os.close(d)


def secure_rmtree(path: Path | str) -> None:
    """Remove a directory tree by descriptor, zeroing every regular file first (:func:`rmtree_at`)."""
    path = Path(path)
    with dir_fd(path.parent, nofollow=False) as d:
        if delete_at(d, path.name, shown=path):
            fsync_fd(d, path.parent)


def hide_and_remove(path: Path | str) -> None:
    """Remove a directory tree with one ``rename()`` to a hidden temporary name first (so it
    vanishes for readers at once), then zero and delete it. A crash midway leaves a leftover
    for :func:`remove_stale_temps`, never a visible directory missing some of its files."""
    path = Path(path)
    with dir_fd(path.parent, nofollow=False) as d:
        hide_and_remove_at(d, path.name, shown=path)


def hide_and_remove_at(dirfd: int, name: str, *, shown: Path | str | None = None) -> None:
    shown = shown or name
    hidden = temp_name(name)
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        os.rename(name, hidden, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except OSError as e:
        raise store_error(e, shown, "remove") from e
    delete_at(dirfd, hidden, expected=inode_key(st), shown=shown)
    fsync_fd(dirfd, shown)


def is_empty_dir_at(dirfd: int, name: str, st: os.stat_result) -> bool:
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except OSError:
        return False
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, prefixes: Iterable[str] = (".",), *,
                       dirfd: int | None = None) -> list[str]:
    """Remove temporary files/directories a killed certd left in ``directory`` (or ``dirfd``).

    Only names starting with one of ``prefixes`` and containing ``.tmp-``, owned by certd's
    effective user, are candidates (someone else's look-alike is left alone); one that is
    ``flock()``ed (being written right now) is skipped. Returns the names removed.
    """
    if dirfd is None:
        try:
            fd = open_dir(directory, nofollow=False)
        except StoreError:
            if not os.path.lexists(directory):
                return []
            raise
        try:
            return remove_stale_temps(directory, prefixes, dirfd=fd)
        finally:
            os.close(fd)
    removed: list[str] = []
    try:
        names = os.listdir(dirfd)
    except OSError as e:
        raise store_error(e, directory, "list") from e
    for name in names:
        if TMP_INFIX not in name or not any(name.startswith(p) for p in prefixes):
            continue
        if _remove_if_unlocked(dirfd, name, directory / name):
            removed.append(name)
    if removed:
        fsync_fd(dirfd, directory)
    return removed


def _remove_if_unlocked(dirfd: int, name: str, shown: Path) -> bool:
    st = lstat_at(dirfd, name)
    if st is None or st.st_uid != os.geteuid():
        return False
    if stat.S_ISLNK(st.st_mode):
        return delete_at(dirfd, name, expected=inode_key(st), shown=shown)
    try:
        fd = open_nofollow(dirfd, name)
    except FileNotFoundError:
        return False
    except OSError:
        return delete_at(dirfd, name, expected=inode_key(st), shown=shown)  # unreadable leftover
    try:
        if inode_key(os.fstat(fd)) != inode_key(st):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        return delete_at(dirfd, name, expected=inode_key(st), shown=shown)
    finally:
        os.close(fd)
