"""``live_dir``: a symlink to ``.NAME.versions/NNNN/`` beside it, switched by one ``rename()``;
every operation through a descriptor of the deploy directory (see :mod:`certd.deploy.files`)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certd import fs as fsutil
from certd.core.errors import StoreError
from certd.core.model import Bundle

from certd.deploy.files import (KeyMatch, Want, deploy_dir, drift_of, fix_attrs_at, holds_any_at, read_file_at, vname)


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
        with deploy_dir(self.link.parent, create=create) as dfd:
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
        if all(read_file_at(vd, n, final / n) == w.data for n, w in wants.items()):
            for n, w in wants.items():
                fix_attrs_at(vd, n, w, final / n)
            return True
        if self._live(dfd) != version:
            return False
        if not repair:
            raise StoreError(f"{final} is live but holds other files than version {version}; "
                             f"switch to another version before staging {version} again")
        for n, w in wants.items():
            if read_file_at(vd, n, final / n) == w.data:
                fix_attrs_at(vd, n, w, final / n)
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
        with deploy_dir(self.link.parent, create=False) as dfd:
            return None if dfd is None else self._live(dfd)

    def switch(self, version: int) -> None:
        with deploy_dir(self.link.parent, create=True) as dfd:
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

    def destroy_keys(self, keys: KeyMatch) -> list[Path]:
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
                    holds = holds_any_at(vd, "privkey.pem", keys, self.root / n / "privkey.pem")
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
            problems.extend(drift_of(base / n, w))
        return problems
