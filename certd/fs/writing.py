"""Writing: a new private file from the first byte, atomic replace (temp + fsync + rename +
directory fsync), atomic symlinks, owned directories, and temporary directories.

See :mod:`certd.fs` for the rules."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from certd.core.errors import StoreError
from certd.fs.oserrors import os_errors, store_error, temp_name
from certd.fs.sync import fsync
from certd.fs.descriptors import DIR_FLAGS, inode_key, dir_fd, fsync_fd, lstat_at, open_dir
from certd.fs.removal import delete_at, is_empty_dir_at, rmtree_at, zero_fd

def _create(path: Path | str, mode: int, uid: int, gid: int, dirfd: int | None = None) -> int:
    """Create ``path`` exclusively, owner-only, then set owner and final mode; return the fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o700,
                 dir_fd=dirfd)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after fchown: chown may clear bits, and the group is right by now
    except BaseException:
        os.close(fd)
        _unlink_quiet(path, dirfd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quiet(path: Path | str, dirfd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dirfd)
    except OSError:
        pass


def write_new(path: Path | str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
              report_as: Path | None = None, dirfd: int | None = None) -> None:
    """Create ``path`` (relative to ``dirfd`` if given), which must not exist, holding ``data``,
    fsynced (directory not fsynced).

    For files inside a temporary directory that one ``rename()`` publishes later; a failure
    removes the partial file. Errors name ``report_as`` (the file's published path) if given.
    """
    shown = report_as or path
    try:
        fd = _create(path, mode, uid, gid, dirfd)
    except OSError as e:
        raise store_error(e, shown) from e
    try:
        _write_all(fd, data)
        fsync(fd)
    except OSError as e:
        _discard(fd, path, dirfd)
        raise store_error(e, shown) from e
    os.close(fd)


def _discard(fd: int, path: Path | str, dirfd: int | None = None) -> None:
    """Zero, close and unlink a partially written file we created; errors ignored."""
    try:
        zero_fd(fd)
    except OSError:
        pass
    os.close(fd)
    _unlink_quiet(path, dirfd)


# A sweep takes one temporary file at most once, but a sweeping thread can take each new one in
# turn: the GIL may pass to it for milliseconds right after our create releases it (under load
# the unit test's tight-loop sweeper won 9 tries in a row once in ~50 runs of 3,000 writes). A
# retry costs only when a sweep took the file: many are cheap.
_SWEPT_RETRIES = 64


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
                 durable: bool = True, lazy: bool = False) -> None:
    """Replace ``path`` with a file holding ``data``: readers see the old file or the new one.

    The new file has ``mode`` (and ``uid``/``gid`` when not -1) from its creation on. On any
    error ``path`` is untouched, the temporary file is gone, and :class:`StoreError` is raised.
    ``durable=False`` skips the directory fsync: still atomic, and never a torn or empty file,
    but a power loss may bring the previous content back (for files where that is harmless).
    ``lazy=True`` skips every fsync: atomic for every process (a SIGKILL included), but after a
    power loss the file may hold the old bytes, the new ones, or be empty or torn: only for a
    file whose reader takes a damaged one for "not written" (docs/PERFORMANCE.md says which).
    """
    path = Path(path)
    try:
        d = os.open(path.parent, DIR_FLAGS)
    except OSError as e:
        raise store_error(e, path) from e
    try:
        atomic_write_at(d, path.name, data, mode=mode, uid=uid, gid=gid, durable=durable, lazy=lazy, shown=path)
    finally:
        os.close(d)


def atomic_write_at(dirfd: int, name: str, data: bytes, *, mode: int = 0o644, uid: int = -1,
                    gid: int = -1, durable: bool = True, lazy: bool = False, shown: Path | str | None = None) -> None:
    """:func:`atomic_write` of ``name`` in the directory ``dirfd``.

    Between creating the temporary file and flocking it, a stale-temp sweep
    (:func:`~certd.fs.removal.remove_stale_temps`, in another thread or process) can take it
    for a killed writer's leftover: it then holds the flock (ours fails with EAGAIN) or has
    unlinked the name (our rename fails with ENOENT). Either way nothing was published, so the
    write starts again under a new temporary name (measured before this: 76 of 3,000 writes
    failed against a sweeping thread; the 3-minute soak saw two renewals fail on lease.json).
    """
    shown = shown or name
    for attempt in range(_SWEPT_RETRIES + 1):
        tmp = temp_name(name)
        try:
            fd = _create(tmp, mode, uid, gid, dirfd)
        except OSError as e:
            raise store_error(e, shown) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use": stale-temp cleanup skips it
            _write_all(fd, data)
            if not lazy:
                fsync(fd)
            os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as e:
            _discard(fd, tmp, dirfd)
            if e.errno in (errno.EAGAIN, errno.ENOENT) and attempt < _SWEPT_RETRIES:
                continue  # swept from under us (see above): again, with a new name
            raise store_error(e, shown) from e
        os.close(fd)
        break
    if durable and not lazy:
        fsync_fd(dirfd, Path(shown).parent if isinstance(shown, Path) else shown)


def fsync_dir(path: Path | str) -> None:
    """Make the directory's entries (created, renamed, removed names) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise store_error(e, path, "open directory") from e
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def atomic_symlink(target: str, link_path: Path | str) -> None:
    """Point ``link_path`` at ``target`` with one ``rename()`` of a fresh symlink over it."""
    link_path = Path(link_path)
    with dir_fd(link_path.parent, nofollow=False) as d:
        atomic_symlink_at(target, d, link_path.name, shown=link_path)


def atomic_symlink_at(target: str, dirfd: int, name: str, *, shown: Path | str | None = None) -> None:
    shown = shown or name
    tmp = temp_name(name)
    try:
        os.symlink(target, tmp, dir_fd=dirfd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except OSError as e:
        _unlink_quiet(tmp, dirfd)
        raise store_error(e, shown, "replace symlink") from e
    fsync_fd(dirfd, shown)


def ensure_dir(path: Path | str, mode: int, *, gid: int = -1) -> None:
    """Create ``path`` with exactly ``mode`` (missing parents 0755) if absent; an existing
    directory is left as it is; anything else at ``path`` is a :class:`StoreError`."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise store_error(e, path, "inspect") from e
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path} exists but is not a directory; move it away so certd can create the directory")
        return
    if not path.parent.is_dir():
        ensure_dir(path.parent, 0o755)
    try:
        with dir_fd(path.parent, nofollow=False) as pfd:
            os.mkdir(path.name, mode & 0o700, dir_fd=pfd)
            fd = os.open(path.name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                if gid != -1:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)  # mkdir's mode is filtered by the umask
            finally:
                os.close(fd)
            fsync_fd(pfd, path.parent)
    except FileExistsError:
        if not path.is_dir():
            raise StoreError(f"{path} exists but is not a directory; "
                             "move it away so certd can create the directory") from None
        return
    except OSError as e:
        raise store_error(e, path, "create directory") from e


class TempDir:
    """A hidden, ``flock()``ed directory filled before one ``rename()`` publishes it.

    ``with TempDir(parent, "0007", mode=0o700) as t: t.write(...); t.publish(parent / "0007")``.
    Leaving the block without a successful publish removes the directory (keys zeroed).
    With ``parent_fd``, everything happens relative to that descriptor of ``parent``.
    """

    def __init__(self, parent: Path, final_name: str, *, mode: int, gid: int = -1,
                 parent_fd: int | None = None) -> None:
        self.parent = parent
        self.name = temp_name(final_name)
        self.path = parent / self.name
        self.final = parent / final_name   # what errors name: the temporary name means nothing to a reader
        self.published = False
        self._pfd = os.dup(parent_fd) if parent_fd is not None else open_dir(parent, nofollow=False)
        try:
            with os_errors(parent / final_name, "create directory"):
                os.mkdir(self.name, mode & 0o700, dir_fd=self._pfd)
                try:
                    self._fd = os.open(self.name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self._pfd)
                except OSError:
                    os.rmdir(self.name, dir_fd=self._pfd)
                    raise
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if gid != -1:
                        os.fchown(self._fd, -1, gid)
                    os.fchmod(self._fd, mode)
                except OSError:
                    os.close(self._fd)
                    os.rmdir(self.name, dir_fd=self._pfd)
                    raise
        except BaseException:
            os.close(self._pfd)
            raise

    def __enter__(self) -> TempDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if not self.published:
                try:
                    rmtree_at(self._pfd, self.name, expected=inode_key(os.fstat(self._fd)), shown=self.path)
                except (StoreError, OSError):
                    pass  # a full or read-only disk: the next cleanup removes it
        finally:
            os.close(self._fd)
            os.close(self._pfd)

    def write(self, name: str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
        write_new(name, data, mode=mode, uid=uid, gid=gid, report_as=self.final / name, dirfd=self._fd)

    def link(self, name: str, source: Path | str) -> None:
        """Put the regular file ``source`` into this directory as ``name`` by a hard link (never
        following a symlink): for bytes that are already on disk and fsynced, which then need no
        second write and no second fsync. OSError if it cannot be linked (gone, another
        filesystem)."""
        os.link(source, name, dst_dir_fd=self._fd, follow_symlinks=False)

    def remove(self, name: str) -> None:
        """Zero and remove a file written into this directory (before it is published)."""
        delete_at(self._fd, name, shown=self.final / name)

    def publish(self, final: Path) -> bool:
        """fsync, then rename to ``final`` (a name in the same parent); False (nothing changed)
        if ``final`` already exists."""
        with os_errors(final, "publish"):
            fsync(self._fd)
            st = lstat_at(self._pfd, final.name)
            if st is not None and not is_empty_dir_at(self._pfd, final.name, st):
                return False
            try:
                os.rename(self.name, final.name, src_dir_fd=self._pfd, dst_dir_fd=self._pfd)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    return False
                raise
        self.published = True
        fsync_fd(self._pfd, self.parent)
        return True
