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
   :class:`~certd.core.errors.StoreError` naming the path (not the temporary file) and the system's
   reason, with a hint for full, read-only or forbidden filesystems. Data never appears in it.

4. **Never through a name someone else can swap.** In a directory certd does not own alone (a
   deploy directory ``www-data`` can write), every operation goes through a descriptor of that
   directory, opened once: ``openat``/``mkdirat``/``renameat``/``unlinkat``/``linkat`` with
   ``O_NOFOLLOW``, ``fchmod``/``fchown`` on the open file, ``(st_dev, st_ino)`` checked before a
   deletion, trees walked by descriptor (:func:`rmtree_at`), never by path. The ``*_at``
   helpers take that descriptor; the path-based helpers open the parent once and call them.

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

from certd.core.errors import StoreError

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


# --- directory descriptors -----------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_dir(path: Path | str, *, nofollow: bool = True) -> int:
    """A descriptor of the directory ``path`` (the final component must not be a symlink unless
    ``nofollow=False``); StoreError otherwise. Close it with ``os.close``."""
    flags = _DIR_FLAGS | (os.O_NOFOLLOW if nofollow else 0)
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
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
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
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
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
            os.fsync(dirfd)
        except OSError as e:
            os.close(fd)
            raise store_error(e, shown, "create directory") from e
    return fd


def open_nofollow(dirfd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """``openat(dirfd, name, flags | O_NOFOLLOW | O_NONBLOCK)``: a symlink is ELOOP, a FIFO does not block."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)


def read_at(dirfd: int, name: str) -> bytes | None:
    """The bytes of the regular file ``name`` in ``dirfd``; None if missing, a symlink or not a
    regular file (never followed, never blocks on a FIFO)."""
    try:
        fd = open_nofollow(dirfd, name)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _wipe_fd(fd: int) -> None:
    """Zero a regular file that has no other name (best effort)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        _zero_fd(fd)


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
        if expected is not None and _key(st) != expected:
            return False
        if stat.S_ISDIR(st.st_mode):
            return rmtree_at(dirfd, name, expected=_key(st), shown=shown)
        fd = _open_for_wipe(dirfd, name) if stat.S_ISREG(st.st_mode) else -1
        try:
            if fd >= 0:
                if _key(os.fstat(fd)) != _key(st):
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
            sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
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
            if expected is not None and _key(os.fstat(sub)) != expected:
                return False
            for entry in os.listdir(sub):
                st = lstat_at(sub, entry)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    rmtree_at(sub, entry, expected=_key(st), shown=f"{shown}/{entry}")
                else:
                    delete_at(sub, entry, expected=_key(st), shown=f"{shown}/{entry}")
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


def fsync_fd(dirfd: int, shown: Path | str) -> None:
    try:
        os.fsync(dirfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise store_error(e, shown, "fsync directory") from e


# --- files ---------------------------------------------------------------------------------

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


def _zero_fd(fd: int) -> None:
    """Overwrite the file's bytes in place with zeros and fsync (best effort on CoW/flash)."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), size - offset)], offset)
    os.fsync(fd)


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
        os.fsync(fd)
    except OSError as e:
        _discard(fd, path, dirfd)
        raise store_error(e, shown) from e
    os.close(fd)


def _discard(fd: int, path: Path | str, dirfd: int | None = None) -> None:
    """Zero, close and unlink a partially written file we created; errors ignored."""
    try:
        _zero_fd(fd)
    except OSError:
        pass
    os.close(fd)
    _unlink_quiet(path, dirfd)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
                 durable: bool = True) -> None:
    """Replace ``path`` with a file holding ``data``: readers see the old file or the new one.

    The new file has ``mode`` (and ``uid``/``gid`` when not -1) from its creation on. On any
    error ``path`` is untouched, the temporary file is gone, and :class:`StoreError` is raised.
    ``durable=False`` skips the directory fsync: still atomic, and never a torn or empty file,
    but a crash may bring the previous content back (for files where that is harmless).
    """
    path = Path(path)
    try:
        d = os.open(path.parent, _DIR_FLAGS)
    except OSError as e:
        raise store_error(e, path) from e
    try:
        atomic_write_at(d, path.name, data, mode=mode, uid=uid, gid=gid, durable=durable, shown=path)
    finally:
        os.close(d)


def atomic_write_at(dirfd: int, name: str, data: bytes, *, mode: int = 0o644, uid: int = -1,
                    gid: int = -1, durable: bool = True, shown: Path | str | None = None) -> None:
    """:func:`atomic_write` of ``name`` in the directory ``dirfd``."""
    shown = shown or name
    tmp = temp_name(name)
    try:
        fd = _create(tmp, mode, uid, gid, dirfd)
    except OSError as e:
        raise store_error(e, shown) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use": stale-temp cleanup skips it
        _write_all(fd, data)
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except OSError as e:
        _discard(fd, tmp, dirfd)
        raise store_error(e, shown) from e
    os.close(fd)
    if durable:
        fsync_fd(dirfd, Path(shown).parent if isinstance(shown, Path) else shown)


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


def secure_delete(path: Path | str) -> None:
    """Overwrite a private key's bytes with zeros, fsync, unlink; missing is fine.

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
        if delete_at(d, path.name, shown=path):
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
    delete_at(dirfd, hidden, expected=_key(st), shown=shown)
    fsync_fd(dirfd, shown)


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
        with dir_fd(path.parent, nofollow=False) as pfd:
            os.mkdir(path.name, mode & 0o700, dir_fd=pfd)
            fd = os.open(path.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
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
                    self._fd = os.open(self.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self._pfd)
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
                    rmtree_at(self._pfd, self.name, expected=_key(os.fstat(self._fd)), shown=self.path)
                except (StoreError, OSError):
                    pass  # a full or read-only disk: the next cleanup removes it
        finally:
            os.close(self._fd)
            os.close(self._pfd)

    def write(self, name: str, data: bytes, *, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
        write_new(name, data, mode=mode, uid=uid, gid=gid, report_as=self.final / name, dirfd=self._fd)

    def publish(self, final: Path) -> bool:
        """fsync, then rename to ``final`` (a name in the same parent); False (nothing changed)
        if ``final`` already exists."""
        with os_errors(final, "publish"):
            os.fsync(self._fd)
            st = lstat_at(self._pfd, final.name)
            if st is not None and not _is_empty_dir_at(self._pfd, final.name, st):
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


def _is_empty_dir_at(dirfd: int, name: str, st: os.stat_result) -> bool:
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
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
        return delete_at(dirfd, name, expected=_key(st), shown=shown)
    try:
        fd = open_nofollow(dirfd, name)
    except FileNotFoundError:
        return False
    except OSError:
        return delete_at(dirfd, name, expected=_key(st), shown=shown)  # unreadable leftover
    try:
        if _key(os.fstat(fd)) != _key(st):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        return delete_at(dirfd, name, expected=_key(st), shown=shown)
    finally:
        os.close(fd)
