"""A plain deploy file (``[[certificate.deploy.file]]``, ``combined``): staged as a hidden
versioned copy beside it, switched by ``rename()`` with the previous copy kept as
``.<basename>.certd-prev``; every operation through a descriptor of its directory."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from certd import fs as fsutil
from certd.core.errors import StoreError
from certd.core.model import Bundle

from certd.deploy.files import (KEY_CONTENTS, KeyMatch, Want, content_of, deploy_dir, drift_of, fix_attrs_at,
                               holds_any_at, inode_at, read_file_at, vname)


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
        with deploy_dir(self.dir, create=True) as d:
            assert d is not None
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            want, name, shown = self._want(bundle), self.staged_name(version), self.staged(version)
            st = fsutil.lstat_at(d, name)
            if st is not None:
                if stat.S_ISREG(st.st_mode) and read_file_at(d, name, shown) == want.data:
                    fix_attrs_at(d, name, want, shown)
                    return
                if inode_at(d, name) == inode_at(d, self.path.name) and not repair:
                    raise StoreError(f"{self.path} is live as version {version} but holds other content; "
                                     f"switch to another version before staging {version} again")
            fsutil.atomic_write_at(d, name, want.data, mode=want.mode, uid=want.uid, gid=want.gid, shown=shown)

    def is_staged(self, version: int) -> bool:
        with deploy_dir(self.dir, create=False) as d:
            st = None if d is None else fsutil.lstat_at(d, self.staged_name(version))
            return st is not None and stat.S_ISREG(st.st_mode)

    def _live(self, d: int) -> int | None:
        try:
            live = inode_at(d, self.path.name)
            if live is None:
                return None
            names = os.listdir(d)
        except OSError as e:
            raise fsutil.store_error(e, self.path, "inspect") from e
        for n in names:
            m = self._staged_re.fullmatch(n)
            if m and inode_at(d, n) == live:
                return int(m.group(1))
        return None

    def live_version(self) -> int | None:
        with deploy_dir(self.dir, create=False) as d:
            return None if d is None else self._live(d)

    def switch(self, version: int) -> None:
        name = self.staged_name(version)
        with deploy_dir(self.dir, create=True) as d:
            assert d is not None
            with fsutil.os_errors(self.path, "switch"):
                st = fsutil.lstat_at(d, name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"{self.staged(version)} is not a regular file certd staged; "
                                     f"stage version {version} again")
                if inode_at(d, name) == inode_at(d, self.path.name):
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
        with deploy_dir(self.dir, create=False) as d:
            if d is None:
                return
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            live = self._live(d)
            for n in os.listdir(d):
                m = self._staged_re.fullmatch(n)
                if not m or int(m.group(1)) in keep or int(m.group(1)) == live:
                    continue
                staged = inode_at(d, n)
                # the backup is this pruned version: it goes too
                if staged is not None and inode_at(d, self.prev_name) == staged:
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
        return drift_of(self.path, self._want(bundle))

    def destroy_keys(self, keys: KeyMatch) -> list[Path]:
        if not self.is_key:
            return []
        with deploy_dir(self.dir, create=False) as d:
            if d is None:
                return []
            fsutil.remove_stale_temps(self.dir, self._temp_prefixes, dirfd=d)
            names = sorted(n for n in os.listdir(d) if self._staged_re.fullmatch(n))
            live = inode_at(d, self.path.name)
            victims = [n for n in (self.prev_name, *names)
                       if (ino := inode_at(d, n)) is not None and ino != live
                       and holds_any_at(d, n, keys, self.dir / n)]
            # A staged copy and .certd-prev may share an inode: drop the extra names first so that
            # deleting the last one zeroes the data instead of only unlinking it.
            last: dict[tuple[int, int], str] = {}
            with fsutil.os_errors(self.dir, "remove key copies in"):
                for n in victims:
                    ino = inode_at(d, n)
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
