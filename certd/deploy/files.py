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

See :mod:`certd.deploy.stage` for what stage/switch/prune mean.
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
from certd.core.model import Bundle

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


def _drift(path: Path, want: Want) -> list[str]:
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


def _fix_attrs_at(dirfd: int, name: str, want: Want, shown: Path) -> None:
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


def _read_at(dirfd: int, name: str, shown: Path) -> bytes | None:
    try:
        return fsutil.read_at(dirfd, name)
    except OSError as e:
        raise fsutil.store_error(e, shown, "read") from e


def _holds_any_at(dirfd: int, name: str, keys: Collection[bytes], shown: Path) -> bool:
    data = _read_at(dirfd, name, shown)
    return data is not None and any(k in data for k in keys)


def _inode_at(dirfd: int, name: str) -> tuple[int, int] | None:
    st = fsutil.lstat_at(dirfd, name)
    return None if st is None else (st.st_dev, st.st_ino)


@contextmanager
def _deploy_dir(path: Path, *, create: bool) -> Iterator[int | None]:
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
    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]: ...


def vname(version: int) -> str:
    return f"{version:04d}"


class LiveDir:
    """``live_dir`` -> ``.<name>.versions/NNNN/``, switched by renaming a fresh symlink."""

    FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")

    def __init__(self, link: Path, key_gid: int) -> None:
        self.link = link
        self.root = link.parent / f".{link.name}.versions"
        self.key_gid = key_gid
        self.key_mode = 0o600 if key_gid == -1 else 0o640

    def describe(self) -> str:
        return f"live_dir {self.link}"

    def _wants(self, bundle: Bundle) -> dict[str, Want]:
        return {"cert.pem": Want(bundle.cert_pem, 0o644), "chain.pem": Want(bundle.chain_pem, 0o644),
                "fullchain.pem": Want(bundle.fullchain_pem, 0o644),
                "privkey.pem": Want(bundle.key_pem, self.key_mode, gid=self.key_gid)}

    @contextmanager
    def _dirs(self, *, create: bool) -> Iterator[tuple[int, int] | None]:
        """(deploy dir fd, versions dir fd); None when there is nothing yet (and not create)."""
        with _deploy_dir(self.link.parent, create=create) as dfd:
            if dfd is None:
                yield None
                return
            if not create and fsutil.lstat_at(dfd, self.root.name) is None:
                yield None
                return
            vfd = fsutil.open_own_dir(dfd, self.root.name, self.root, create_mode=0o755 if create else None)
            try:
                yield dfd, vfd
            finally:
                os.close(vfd)

    def _refuse_foreign(self, dfd: int) -> None:
        st = fsutil.lstat_at(dfd, self.link.name)
        if st is not None and not stat.S_ISLNK(st.st_mode):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            raise StoreError(f"live_dir {self.link} is a real {kind} (left by certbot or a manual setup?); "
                             f"certd replaces it with a symlink only once you move it away, "
                             f"e.g. mv {self.link} {self.link}.orig")

    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None:
        with self._dirs(create=True) as dirs:
            assert dirs is not None
            dfd, vfd = dirs
            self._refuse_foreign(dfd)
            fsutil.remove_stale_temps(self.root, dirfd=vfd)
            # the live_dir link's own temporaries (symlinks)
            fsutil.remove_stale_temps(self.link.parent, (f".{self.link.name}{fsutil.TMP_INFIX}",), dirfd=dfd)
            wants = self._wants(bundle)
            name = vname(version)
            final = self.root / name
            st = fsutil.lstat_at(vfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                vd = fsutil.open_dir_at(vfd, name, final)
                try:
                    if self._stage_existing(dfd, vd, version, wants, final, repair):
                        return
                finally:
                    os.close(vd)
            with fsutil.TempDir(self.root, name, mode=0o755, parent_fd=vfd) as tmp:
                for n, w in wants.items():
                    tmp.write(n, w.data, mode=w.mode, uid=w.uid, gid=w.gid)
                if fsutil.lstat_at(vfd, name) is not None:
                    fsutil.hide_and_remove_at(vfd, name, shown=final)  # stale, not live: replace it whole
                if not tmp.publish(final):
                    raise StoreError(f"{final} appeared while staging; is another certd deploying {self.link}?")

    def _stage_existing(self, dfd: int, vd: int, version: int, wants: dict[str, Want], final: Path,
                        repair: bool) -> bool:
        """Reuse (fixing owner/mode) or repair an existing version directory; False: replace it."""
        if all(_read_at(vd, n, final / n) == w.data for n, w in wants.items()):
            for n, w in wants.items():
                _fix_attrs_at(vd, n, w, final / n)
            return True
        if self._live(dfd) != version:
            return False
        if not repair:
            raise StoreError(f"{final} is live but holds other files than version {version}; "
                             f"switch to another version before staging {version} again")
        for n, w in wants.items():
            if _read_at(vd, n, final / n) == w.data:
                _fix_attrs_at(vd, n, w, final / n)
            else:
                fsutil.atomic_write_at(vd, n, w.data, mode=w.mode, uid=w.uid, gid=w.gid, shown=final / n)
        return True

    def is_staged(self, version: int) -> bool:
        with self._dirs(create=False) as dirs:
            if dirs is None:
                return False
            st = fsutil.lstat_at(dirs[1], vname(version))
            if st is None or not stat.S_ISDIR(st.st_mode):
                return False
            vd = fsutil.open_dir_at(dirs[1], vname(version), self.root / vname(version))
            try:
                return all((s := fsutil.lstat_at(vd, n)) is not None and stat.S_ISREG(s.st_mode)
                           for n in self.FILES)
            finally:
                os.close(vd)

    def _live(self, dfd: int) -> int | None:
        try:
            target = os.readlink(self.link.name, dir_fd=dfd)
        except OSError:  # missing, or not a symlink
            return None
        m = re.fullmatch(rf"(?:{re.escape(str(self.root))}|{re.escape(self.root.name)})/(\d+)/?", target)
        return int(m.group(1)) if m else None

    def live_version(self) -> int | None:
        with _deploy_dir(self.link.parent, create=False) as dfd:
            return None if dfd is None else self._live(dfd)

    def switch(self, version: int) -> None:
        with _deploy_dir(self.link.parent, create=True) as dfd:
            assert dfd is not None
            self._refuse_foreign(dfd)
            if self._live(dfd) != version:
                fsutil.atomic_symlink_at(f"{self.root.name}/{vname(version)}", dfd, self.link.name, shown=self.link)

    def prune(self, keep: set[int]) -> None:
        with self._dirs(create=False) as dirs:
            if dirs is None:
                return
            dfd, vfd = dirs
            fsutil.remove_stale_temps(self.root, dirfd=vfd)
            live = self._live(dfd)
            for n in os.listdir(vfd):
                if n.isdigit() and int(n) not in keep and int(n) != live:
                    fsutil.hide_and_remove_at(vfd, n, shown=self.root / n)

    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]:
        with self._dirs(create=False) as dirs:
            if dirs is None:
                return []
            dfd, vfd = dirs
            fsutil.remove_stale_temps(self.root, dirfd=vfd)  # a killed writer's leftovers may hold the key too
            live = self._live(dfd)
            removed = []
            for n in sorted(os.listdir(vfd)):
                if not n.isdigit() or int(n) == live:
                    continue
                st = fsutil.lstat_at(vfd, n)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    continue
                vd = fsutil.open_dir_at(vfd, n, self.root / n)
                try:
                    holds = _holds_any_at(vd, "privkey.pem", keys, self.root / n / "privkey.pem")
                finally:
                    os.close(vd)
                if holds:
                    fsutil.hide_and_remove_at(vfd, n, shown=self.root / n)
                    removed.append(self.root / n)
            return removed

    def check(self, version: int, bundle: Bundle) -> list[str]:
        live = self.live_version()
        if live == version:
            base, problems = self.link, []
        else:
            try:
                now = repr(os.readlink(self.link))
            except OSError:
                now = "nothing (missing or not a symlink)"
            base = self.root / vname(version)
            problems = [f"{self.link}: points at {now}, expected {self.root.name}/{vname(version)}"]
        for n, w in self._wants(bundle).items():
            problems.extend(_drift(base / n, w))
        return problems


class PlainFile:
    """One file (combined PEM or a [[certificate.deploy.files]] entry) staged as
    ``.<name>.certd-NNNN`` and hard-linked + renamed into place."""

    def __init__(self, path: Path, content: str, mode: int, uid: int, gid: int) -> None:
        self.path, self.content = path, content
        self.mode, self.uid, self.gid = mode, uid, gid
        self.dir = path.parent
        self.prev_name = f".{path.name}.certd-prev"
        self.prev = self.dir / self.prev_name
        self._staged_re = re.compile(rf"\.{re.escape(path.name)}\.certd-(\d+)")
        # atomic_write temporaries of staged/prev files, and the hard link made by switch
        self._temp_prefixes = (f"..{path.name}.certd-", f".{path.name}{fsutil.TMP_INFIX}")

    @property
    def is_key(self) -> bool:
        return self.content in KEY_CONTENTS

    def describe(self) -> str:
        return f"{self.content} {self.path}"

    def staged_name(self, version: int) -> str:
        return f".{self.path.name}.certd-{vname(version)}"

    def staged(self, version: int) -> Path:
        return self.dir / self.staged_name(version)

    def _want(self, bundle: Bundle) -> Want:
        return Want(content_of(bundle, self.content), self.mode, self.uid, self.gid)

    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None:
        with _deploy_dir(self.dir, create=True) as d:
            assert d is not None
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            want, name, shown = self._want(bundle), self.staged_name(version), self.staged(version)
            st = fsutil.lstat_at(d, name)
            if st is not None:
                if stat.S_ISREG(st.st_mode) and _read_at(d, name, shown) == want.data:
                    _fix_attrs_at(d, name, want, shown)
                    return
                if _inode_at(d, name) == _inode_at(d, self.path.name) and not repair:
                    raise StoreError(f"{self.path} is live as version {version} but holds other content; "
                                     f"switch to another version before staging {version} again")
            fsutil.atomic_write_at(d, name, want.data, mode=want.mode, uid=want.uid, gid=want.gid, shown=shown)

    def is_staged(self, version: int) -> bool:
        with _deploy_dir(self.dir, create=False) as d:
            st = None if d is None else fsutil.lstat_at(d, self.staged_name(version))
            return st is not None and stat.S_ISREG(st.st_mode)

    def _live(self, d: int) -> int | None:
        try:
            live = _inode_at(d, self.path.name)
            if live is None:
                return None
            names = os.listdir(d)
        except OSError as e:
            raise fsutil.store_error(e, self.path, "inspect") from e
        for n in names:
            m = self._staged_re.fullmatch(n)
            if m and _inode_at(d, n) == live:
                return int(m.group(1))
        return None

    def live_version(self) -> int | None:
        with _deploy_dir(self.dir, create=False) as d:
            return None if d is None else self._live(d)

    def switch(self, version: int) -> None:
        name = self.staged_name(version)
        with _deploy_dir(self.dir, create=True) as d:
            assert d is not None
            with fsutil.os_errors(self.path, "switch"):
                st = fsutil.lstat_at(d, name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"{self.staged(version)} is not a regular file certd staged; "
                                     f"stage version {version} again")
                if _inode_at(d, name) == _inode_at(d, self.path.name):
                    return
                live = fsutil.lstat_at(d, self.path.name)
                if live is not None and stat.S_ISREG(live.st_mode):  # keep it as .certd-prev
                    prev = fsutil.lstat_at(d, self.prev_name)
                    if self.is_key and prev is not None and prev.st_nlink == 1:
                        # its last name: zero the old key, don't just drop it
                        fsutil.delete_at(d, self.prev_name, expected=(prev.st_dev, prev.st_ino), shown=self.prev)
                    try:
                        _link_over_at(d, self.path.name, self.prev_name, self.path)
                    except StoreError:
                        pass  # swapped meanwhile: nothing of ours to keep
                _link_over_at(d, name, self.path.name, self.staged(version))
            fsutil.fsync_fd(d, self.dir)

    def prune(self, keep: set[int]) -> None:
        with _deploy_dir(self.dir, create=False) as d:
            if d is None:
                return
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            live = self._live(d)
            for n in os.listdir(d):
                m = self._staged_re.fullmatch(n)
                if not m or int(m.group(1)) in keep or int(m.group(1)) == live:
                    continue
                staged = _inode_at(d, n)
                # the backup is this pruned version: it goes too
                if staged is not None and _inode_at(d, self.prev_name) == staged:
                    with fsutil.os_errors(self.prev, "remove"):
                        os.unlink(self.prev_name, dir_fd=d)
                if self.is_key:
                    fsutil.delete_at(d, n, expected=staged, shown=self.dir / n)
                else:
                    with fsutil.os_errors(self.dir / n, "remove"):
                        try:
                            os.unlink(n, dir_fd=d)
                        except FileNotFoundError:
                            pass
            fsutil.fsync_fd(d, self.dir)

    def check(self, version: int, bundle: Bundle) -> list[str]:
        return _drift(self.path, self._want(bundle))

    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]:
        if not self.is_key:
            return []
        with _deploy_dir(self.dir, create=False) as d:
            if d is None:
                return []
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            names = sorted(n for n in os.listdir(d) if self._staged_re.fullmatch(n))
            live = _inode_at(d, self.path.name)
            victims = [n for n in (self.prev_name, *names)
                       if (ino := _inode_at(d, n)) is not None and ino != live
                       and _holds_any_at(d, n, keys, self.dir / n)]
            # A staged copy and .certd-prev may share an inode: drop the extra names first so that
            # deleting the last one zeroes the data instead of only unlinking it.
            last: dict[tuple[int, int], str] = {}
            with fsutil.os_errors(self.dir, "remove key copies in"):
                for n in victims:
                    ino = _inode_at(d, n)
                    if ino is None:
                        continue
                    other = last.get(ino)
                    if other is not None:
                        os.unlink(other, dir_fd=d)
                    last[ino] = n
            for ino, n in last.items():
                fsutil.delete_at(d, n, expected=ino, shown=self.dir / n)
            fsutil.fsync_fd(d, self.dir)
            return [self.dir / n for n in victims]


def _link_over_at(d: int, src: str, dst: str, shown: Path) -> bool:
    """Give ``src``'s inode the name ``dst`` atomically: hard link to a temp name, rename over.

    The link is made from a descriptor opened with ``O_NOFOLLOW`` (``linkat`` of
    ``/proc/self/fd/N``), so what gets linked is the regular file that was checked, even if the
    name is swapped for a symlink a microsecond later (F4). False (nothing done) if ``src`` is
    missing; StoreError if it is not a regular file."""
    try:
        fd = fsutil.open_nofollow(d, src)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise StoreError(f"{shown} is not a regular file certd staged (a symlink or something else); "
                             f"certd does not link it: remove it") from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{shown} is not a regular file certd staged; certd does not link it: remove it")
        tmp = fsutil.temp_name(dst)
        os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=d, follow_symlinks=True)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, dst, src_dir_fd=d, dst_dir_fd=d)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=d)
        except OSError:
            pass
        raise
    return True


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
