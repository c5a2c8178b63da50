"""Crash-safe, permission-safe file operations: how certd puts bytes on disk.

Three rules, because TLS servers read these files while certd writes them:

1. **Never a wider mode, not even for an instant.** A new file is created by ``open(O_CREAT |
   O_EXCL)`` with at most the owner's bits of its final mode, so the kernel itself creates it
   private; then ``fchown`` (when asked) and ``fchmod`` to the final mode, all before the first
   byte is written. Widening to a group only after the group is set means nobody outside that
   group can ever hold it open (permissions are checked at ``open()``, so an early open by the
   wrong group would read the key later). No create-then-chmod of a file with data in it.
2. **Readers see the old file or the new one, never a mix.** Write a hidden temporary file beside
   the target, ``fsync`` it, ``rename()`` it over the target, ``fsync`` the directory (the
   rename is only durable once the directory is). A failure removes the temporary file and
   leaves the target exactly as it was.
3. **Errors an operator can act on.** Every ``OSError`` becomes one-line
   :class:`~certd.errors.StoreError` naming the path (not the temporary file) and the system's
   reason, with a hint for full, read-only or forbidden filesystems. Data never appears in it.

Temporary names are ``.<final name>.tmp-<random>``. A temporary file or directory is
``flock()``ed while it is being filled, so :func:`remove_stale_temps` can clean up what a
killed process left behind without touching one that another process is still writing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from certd.errors import StoreError

TMP_INFIX = ".tmp-"
_ZEROS = bytes(64 * 1024)
_HINTS = {
    errno.ENOSPC: "the filesystem is full; free some space",
    errno.EDQUOT: "the disk quota is exhausted; free some space or raise the quota",
    errno.EROFS: "the filesystem is mounted read-only",
    errno.EACCES: "permission denied; check the owner and mode of the directory",
    errno.EPERM: "operation not permitted; check the owner, mode and attributes (chattr) of the directory",
}


def temp_name(final_name: str) -> str:
    """The hidden name a temporary file for ``final_name`` gets in the same directory."""
    return f".{final_name}{TMP_INFIX}{secrets.token_hex(6)}"


def store_error(err: OSError, path: Path | str, action: str = "write") -> StoreError:
    """``cannot write /etc/ssl/x/privkey.pem: No space left on device (the filesystem is full...)``."""
    reason = err.strerror or str(err)
    hint = _HINTS.get(err.errno or 0)
    return StoreError(f"cannot {action} {path}: {reason}" + (f" ({hint})" if hint else ""))


@contextmanager
def os_errors(path: Path | str, action: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :class:`StoreError` about ``path``."""
    try:
        yield
    except OSError as e:
        raise store_error(e, path, action) from e


# --- files ---------------------------------------------------------------------------------

def _create(path: Path, mode: int, uid: int, gid: int) -> int:
    """Create ``path`` exclusively, owner-only, then set owner and final mode; return the fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o700)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after fchown: chown may clear bits, and the group is right by now
    except BaseException:
        os.close(fd)
        _unlink_quiet(path)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _zero_fd(fd: int) -> None:
    """Overwrite the file's bytes in place with zeros and fsync (best effort on CoW/flash)."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), size - offset)], offset)
    os.fsync(fd)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_new(path: Path, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
              report_as: Path | None = None) -> None:
    """Create ``path``, which must not exist, holding ``data``, fsynced (directory not fsynced).

    For files inside a temporary directory that one ``rename()`` publishes later; a failure
    removes the partial file. Errors name ``report_as`` (the file's published path) if given.
    """
    shown = report_as or path
    try:
        fd = _create(path, mode, uid, gid)
    except OSError as e:
        raise store_error(e, shown) from e
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as e:
        _discard(fd, path)
        raise store_error(e, shown) from e
    os.close(fd)


def _discard(fd: int, path: Path) -> None:
    """Zero, close and unlink a partially written file we created; errors ignored."""
    try:
        _zero_fd(fd)
    except OSError:
        pass
    os.close(fd)
    _unlink_quiet(path)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
                 durable: bool = True) -> None:
    """Replace ``path`` with a file holding ``data``: readers see the old file or the new one.

    The new file has ``mode`` (and ``uid``/``gid`` when not -1) from its creation on. On any
    error ``path`` is untouched, the temporary file is gone, and :class:`StoreError` is raised.
    ``durable=False`` skips the directory fsync: still atomic, and never a torn or empty file,
    but a crash may bring the previous content back (for files where that is harmless).
    """
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        fd = _create(tmp, mode, uid, gid)
    except OSError as e:
        raise store_error(e, path) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use": stale-temp cleanup skips it
        _write_all(fd, data)
        os.fsync(fd)
        os.rename(tmp, path)
    except OSError as e:
        _discard(fd, tmp)
        raise store_error(e, path) from e
    os.close(fd)
    if durable:
        fsync_dir(path.parent)


def identity(path: Path | str) -> tuple[int, int, int]:
    """(inode, mtime in ns, size) of ``path``: changes whenever the file is rewritten or
    replaced by rename(), so caches of what it holds can be keyed by it. OSError if absent."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def fsync_dir(path: Path | str) -> None:
    """Make the directory's entries (created, renamed, removed names) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise store_error(e, path, "open directory") from e
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems without directory fsync
            raise store_error(e, path, "fsync directory") from e
    finally:
        os.close(fd)


def atomic_symlink(target: str, link_path: Path | str) -> None:
    """Point ``link_path`` at ``target`` with one ``rename()`` of a fresh symlink over it."""
    link_path = Path(link_path)
    tmp = link_path.with_name(temp_name(link_path.name))
    try:
        os.symlink(target, tmp)
        os.rename(tmp, link_path)
    except OSError as e:
        _unlink_quiet(tmp)
        raise store_error(e, link_path, "replace symlink") from e
    fsync_dir(link_path.parent)


def secure_delete(path: Path | str) -> None:
    """Overwrite a private key's bytes with zeros, fsync, unlink; missing is fine.

    A file with other hard links (a deployed copy sharing the inode) is only unlinked: zeroing
    it would destroy the file still in use under its other name. A symlink is unlinked, never
    followed. Overwriting is best effort on copy-on-write filesystems and flash.
    """
    path = Path(path)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            os.chmod(path, 0o600)  # our own read-only key file (a symlink would be ELOOP)
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise store_error(e, path, "delete") from e
        fd = -1  # a symlink, directory or special file: nothing of ours to zero
    try:
        if fd >= 0:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                _zero_fd(fd)
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise store_error(e, path, "delete") from e
    finally:
        if fd >= 0:
            os.close(fd)
    fsync_dir(path.parent)


def secure_rmtree(path: Path | str) -> None:
    """Remove a directory tree, zeroing every regular file first (see :func:`secure_delete`)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        secure_delete(path)
        return
    with os_errors(path, "delete"):
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _secure_delete_nosync(Path(root, name))
            for name in dirs:
                sub = Path(root, name)
                if sub.is_symlink():
                    os.unlink(sub)
                else:
                    os.rmdir(sub)
        os.rmdir(path)
    fsync_dir(path.parent)


def hide_and_remove(path: Path | str) -> None:
    """Remove a directory tree with one ``rename()`` to a hidden temporary name first (so it
    vanishes for readers at once), then zero and delete it. A crash midway leaves a leftover
    for :func:`remove_stale_temps`, never a visible directory missing some of its files."""
    path = Path(path)
    hidden = path.with_name(temp_name(path.name))
    with os_errors(path, "remove"):
        os.rename(path, hidden)
    secure_rmtree(hidden)


def _secure_delete_nosync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        os.unlink(path)  # symlink or unwritable: just drop the name
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            _zero_fd(fd)
    finally:
        os.close(fd)
    os.unlink(path)


# --- directories -----------------------------------------------------------------------------

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
        os.mkdir(path, mode & 0o700)
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        if not path.is_dir():
            raise StoreError(f"{path} exists but is not a directory; move it away so certd can create the directory") from None
        return
    except OSError as e:
        raise store_error(e, path, "create directory") from e
    fsync_dir(path.parent)


class TempDir:
    """A hidden, ``flock()``ed directory filled before one ``rename()`` publishes it.

    ``with TempDir(parent, "0007", mode=0o700) as t: t.write(...); t.publish(parent / "0007")``.
    Leaving the block without a successful publish removes the directory (keys zeroed).
    """

    def __init__(self, parent: Path, final_name: str, *, mode: int, gid: int = -1) -> None:
        self.parent = parent
        self.path = parent / temp_name(final_name)
        self.final = parent / final_name   # what errors name: the temporary name means nothing to a reader
        self.published = False
        with os_errors(parent / final_name, "create directory"):
            os.mkdir(self.path, mode & 0o700)
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                os.rmdir(self.path)
                raise
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if gid != -1:
                    os.fchown(self._fd, -1, gid)
                os.fchmod(self._fd, mode)
            except OSError:
                os.close(self._fd)
                os.rmdir(self.path)
                raise

    def __enter__(self) -> TempDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if not self.published:
                try:
                    secure_rmtree(self.path)
                except StoreError:
                    pass  # a full or read-only disk: the next cleanup removes it
        finally:
            os.close(self._fd)

    def write(self, name: str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
        write_new(self.path / name, data, mode=mode, uid=uid, gid=gid, report_as=self.final / name)

    def publish(self, final: Path) -> bool:
        """fsync, then rename to ``final``; False (nothing changed) if ``final`` already exists."""
        with os_errors(final, "publish"):
            os.fsync(self._fd)
            if os.path.lexists(final) and not _is_empty_dir(final):
                return False
            try:
                os.rename(self.path, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return False
                raise
        self.published = True
        fsync_dir(self.parent)
        return True


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def remove_stale_temps(directory: Path, prefixes: Iterable[str] = (".",)) -> list[str]:
    """Remove temporary files/directories a killed process left in ``directory``.

    Only names starting with one of ``prefixes`` and containing ``.tmp-`` are candidates; one
    that is ``flock()``ed (being written right now) is skipped. Returns the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    except OSError as e:
        raise store_error(e, directory, "list") from e
    for name in names:
        if TMP_INFIX not in name or not any(name.startswith(p) for p in prefixes):
            continue
        if _remove_if_unlocked(directory / name):
            removed.append(name)
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        secure_delete(path)  # a symlink (ELOOP) or unreadable leftover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        secure_rmtree(path)
    finally:
        os.close(fd)
    return True
