"""Putting a stored version where TLS servers read it: stage beside the live files, then switch.

``stage`` writes everything for version N under hidden names next to the live files; nothing a
reader opens changes, and running it again is harmless. ``switch`` makes N live with one
``rename()`` per target, after checking that every target is staged, so a crash or a full disk
leaves each target on the old version or the new one, complete. A failure partway through the
targets leaves the earlier ones on N: the rotation then switches back to the previous version
(stage and switch are idempotent, a switch to the live version is a no-op).

Targets (docs/ARCHITECTURE.md):

- ``live_dir = /x/www`` is a symlink to ``.www.versions/NNNN`` holding cert.pem chain.pem
  fullchain.pem privkey.pem. The switch renames a fresh symlink over it, so a reader that
  resolves the directory once (opens it, then reads cert and key) always gets a matching pair.
  A real directory there (certbot's, a manual setup) is refused, never clobbered.
- ``combined = /x/www.pem`` (fullchain + key, as HAProxy reads it) and plain ``files``: the
  version is staged as ``.www.pem.certd-NNNN`` (a dot-file: HAProxy's crt directories skip
  them). The switch hard-links it to a temporary name and renames that over ``www.pem``, so the
  live file and its staged name share an inode: that is how :func:`deployed_version` knows N,
  and why switching back to a staged version rewrites nothing. The replaced file is kept as
  ``.www.pem.certd-prev`` (a hard link made before the rename).

Separate plain files for cert and key are each replaced atomically, not together; prefer
``live_dir`` or ``combined`` when a reader may load them while a switch happens.
Private keys are 0600, or 0640 owned by the configured group, from their first byte.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from certd import fsutil
from certd.config import CertificateConfig
from certd.errors import ConfigError, StoreError
from certd.model import Bundle

KEY_CONTENTS = ("privkey", "combined")


def stage(cert: CertificateConfig, version: int, bundle: Bundle, *, repair: bool = False) -> None:
    """Write everything for ``version`` beside the live files; nothing readers see changes.

    A live ``version`` whose files were edited out of band is refused (StoreError), unless
    ``repair``: then the edited files are rewritten (drift repair; each file atomically, and all
    of them belong to ``version``, so a reader never pairs a certificate with another key)."""
    for target in _targets(cert):
        target.stage(version, bundle, repair)


def switch(cert: CertificateConfig, version: int) -> None:
    """Make ``version`` live on every target, one rename() each; StoreError if not staged."""
    targets = _targets(cert)
    missing = [t.describe() for t in targets if not t.is_staged(version)]
    if missing:
        raise StoreError(f"{cert.name}: version {version} is not staged for {', '.join(missing)}; stage it first")
    for target in targets:
        target.switch(version)


def deployed_version(cert: CertificateConfig) -> int | None:
    """The version live_dir (or else the first target) serves now; None if none of ours."""
    targets = _targets(cert)
    return targets[0].live_version() if targets else None


def prune(cert: CertificateConfig, keep_versions: Collection[int]) -> None:
    """Remove staged and old versions not in ``keep_versions`` (never the live one; keys zeroed)
    and leftovers of interrupted writes."""
    for target in _targets(cert):
        target.prune(set(keep_versions))


def destroy_keys(cert: CertificateConfig, keys: Collection[bytes]) -> list[Path]:
    """Zero and remove every staged, old or backup copy (``.certd-prev``) of these private keys in
    ``cert``'s targets (after keyCompromise). What is live is never touched: switch away first.
    Returns the paths removed; a version directory counts as one."""
    keys = [k for k in keys if k]
    removed: list[Path] = []
    if keys:
        for target in _targets(cert):
            removed.extend(target.destroy_keys(keys))
    return removed


def _holds_any(path: Path, keys: Collection[bytes]) -> bool:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return False
    except OSError as e:
        raise fsutil.store_error(e, path, "read") from e
    return any(k in data for k in keys)


def check(cert: CertificateConfig, version: int, bundle: Bundle) -> list[str]:
    """What on disk differs from ``version`` (pointer, content, owner, mode); empty if all is well.
    Lines name paths, never key material."""
    problems: list[str] = []
    for target in _targets(cert):
        problems.extend(target.check(version, bundle))
    return problems


# --- what a file must look like ----------------------------------------------------------------

@dataclass(frozen=True)
class _Want:
    data: bytes
    mode: int
    uid: int = -1   # -1: whoever certd runs as
    gid: int = -1   # -1: not managed

    def __repr__(self) -> str:  # data may be a key
        return f"_Want(mode={self.mode:04o}, uid={self.uid}, gid={self.gid})"


def _content(bundle: Bundle, content: str) -> bytes:
    return {"cert": bundle.cert_pem, "chain": bundle.chain_pem, "fullchain": bundle.fullchain_pem,
            "privkey": bundle.key_pem, "combined": bundle.combined_pem}[content]


def _drift(path: Path, want: _Want) -> list[str]:
    try:
        st = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
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
        problems.append(f"{path}: owner {_user_name(st.st_uid)}, expected {_user_name(uid)}")
    if want.gid != -1 and st.st_gid != want.gid:
        problems.append(f"{path}: group {_group_name(st.st_gid)}, expected {_group_name(want.gid)}")
    return problems


def _fix_attrs(path: Path, want: _Want) -> None:
    """Bring owner and mode of an already staged file in line without ever widening access to
    the wrong group: narrow first, then chown, then the final mode."""
    with fsutil.os_errors(path, "set owner/mode of"):
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        want_uid = os.geteuid() if want.uid == -1 else want.uid
        uid = -1 if want_uid == st.st_uid else want_uid
        gid = -1 if want.gid in (-1, st.st_gid) else want.gid
        if uid != -1 or gid != -1:
            os.chmod(path, mode & want.mode)
            os.chown(path, uid, gid)
        if mode != want.mode or uid != -1 or gid != -1:
            os.chmod(path, want.mode)


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
    except OSError as e:
        raise fsutil.store_error(e, path, "read") from e


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- targets -------------------------------------------------------------------------------------

class _Target(Protocol):
    def describe(self) -> str: ...
    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None: ...
    def is_staged(self, version: int) -> bool: ...
    def switch(self, version: int) -> None: ...
    def live_version(self) -> int | None: ...
    def prune(self, keep: set[int]) -> None: ...
    def check(self, version: int, bundle: Bundle) -> list[str]: ...
    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]: ...


def _vname(version: int) -> str:
    return f"{version:04d}"


class _LiveDir:
    """``live_dir`` -> ``.<name>.versions/NNNN/``, switched by renaming a fresh symlink."""

    FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")

    def __init__(self, link: Path, key_gid: int) -> None:
        self.link = link
        self.root = link.parent / f".{link.name}.versions"
        self.key_gid = key_gid
        self.key_mode = 0o600 if key_gid == -1 else 0o640

    def describe(self) -> str:
        return f"live_dir {self.link}"

    def _wants(self, bundle: Bundle) -> dict[str, _Want]:
        return {"cert.pem": _Want(bundle.cert_pem, 0o644), "chain.pem": _Want(bundle.chain_pem, 0o644),
                "fullchain.pem": _Want(bundle.fullchain_pem, 0o644),
                "privkey.pem": _Want(bundle.key_pem, self.key_mode, gid=self.key_gid)}

    def _refuse_foreign(self) -> None:
        if os.path.lexists(self.link) and not self.link.is_symlink():
            kind = "directory" if self.link.is_dir() else "file"
            raise StoreError(f"live_dir {self.link} is a real {kind} (left by certbot or a manual setup?); "
                             f"certd replaces it with a symlink only once you move it away, "
                             f"e.g. mv {self.link} {self.link}.orig")

    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None:
        self._refuse_foreign()
        fsutil.ensure_dir(self.link.parent, 0o755)
        fsutil.ensure_dir(self.root, 0o755)
        fsutil.remove_stale_temps(self.root)
        fsutil.remove_stale_temps(self.link.parent, (f".{self.link.name}{fsutil.TMP_INFIX}",))  # symlinks
        wants = self._wants(bundle)
        final = self.root / _vname(version)
        if final.is_dir():
            if all(_same_content(final / n, w.data) for n, w in wants.items()):
                for n, w in wants.items():
                    _fix_attrs(final / n, w)
                return
            if self.live_version() == version:
                if not repair:
                    raise StoreError(f"{final} is live but holds other files than version {version}; "
                                     f"switch to another version before staging {version} again")
                for n, w in wants.items():
                    if _same_content(final / n, w.data):
                        _fix_attrs(final / n, w)
                    else:
                        fsutil.atomic_write(final / n, w.data, mode=w.mode, uid=w.uid, gid=w.gid)
                return
        with fsutil.TempDir(self.root, _vname(version), mode=0o755) as tmp:
            for n, w in wants.items():
                tmp.write(n, w.data, mode=w.mode, uid=w.uid, gid=w.gid)
            if os.path.lexists(final):
                fsutil.hide_and_remove(final)  # stale, not live: replace it whole
            if not tmp.publish(final):
                raise StoreError(f"{final} appeared while staging; is another certd deploying {self.link}?")

    def is_staged(self, version: int) -> bool:
        d = self.root / _vname(version)
        return all((d / n).is_file() for n in self.FILES)

    def live_version(self) -> int | None:
        try:
            target = os.readlink(self.link)
        except OSError:  # missing, or not a symlink
            return None
        m = re.fullmatch(rf"(?:{re.escape(str(self.root))}|{re.escape(self.root.name)})/(\d+)/?", target)
        return int(m.group(1)) if m else None

    def switch(self, version: int) -> None:
        self._refuse_foreign()
        if self.live_version() != version:
            fsutil.atomic_symlink(f"{self.root.name}/{_vname(version)}", self.link)

    def prune(self, keep: set[int]) -> None:
        fsutil.remove_stale_temps(self.root)
        live = self.live_version()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for n in names:
            if n.isdigit() and int(n) not in keep and int(n) != live:
                fsutil.hide_and_remove(self.root / n)

    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]:
        fsutil.remove_stale_temps(self.root)  # a killed writer's leftovers may hold the key too
        live = self.live_version()
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        removed = []
        for n in names:
            if n.isdigit() and int(n) != live and _holds_any(self.root / n / "privkey.pem", keys):
                fsutil.hide_and_remove(self.root / n)
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
            base = self.root / _vname(version)
            problems = [f"{self.link}: points at {now}, expected {self.root.name}/{_vname(version)}"]
        for n, w in self._wants(bundle).items():
            problems.extend(_drift(base / n, w))
        return problems


class _PlainFile:
    """One file (combined PEM or a [[certificate.deploy.files]] entry) staged as
    ``.<name>.certd-NNNN`` and hard-linked + renamed into place."""

    def __init__(self, path: Path, content: str, mode: int, uid: int, gid: int) -> None:
        self.path, self.content = path, content
        self.mode, self.uid, self.gid = mode, uid, gid
        self.dir = path.parent
        self.prev = self.dir / f".{path.name}.certd-prev"
        self._staged_re = re.compile(rf"\.{re.escape(path.name)}\.certd-(\d+)")
        # atomic_write temporaries of staged/prev files, and the hard link made by switch
        self._temp_prefixes = (f"..{path.name}.certd-", f".{path.name}{fsutil.TMP_INFIX}")

    @property
    def is_key(self) -> bool:
        return self.content in KEY_CONTENTS

    def describe(self) -> str:
        return f"{self.content} {self.path}"

    def staged(self, version: int) -> Path:
        return self.dir / f".{self.path.name}.certd-{_vname(version)}"

    def _want(self, bundle: Bundle) -> _Want:
        return _Want(_content(bundle, self.content), self.mode, self.uid, self.gid)

    def stage(self, version: int, bundle: Bundle, repair: bool = False) -> None:
        fsutil.ensure_dir(self.dir, 0o755)
        fsutil.remove_stale_temps(self.dir, self._temp_prefixes)
        want, staged = self._want(bundle), self.staged(version)
        if os.path.lexists(staged):
            if _same_content(staged, want.data):
                _fix_attrs(staged, want)
                return
            if _same_inode(staged, self.path) and not repair:  # repair: a fresh inode, switched in
                raise StoreError(f"{self.path} is live as version {version} but holds other content; "
                                 f"switch to another version before staging {version} again")
        fsutil.atomic_write(staged, want.data, mode=want.mode, uid=want.uid, gid=want.gid)

    def is_staged(self, version: int) -> bool:
        return self.staged(version).is_file()

    def live_version(self) -> int | None:
        try:
            live = os.lstat(self.path)
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise fsutil.store_error(e, self.path, "inspect") from e
        for n in names:
            m = self._staged_re.fullmatch(n)
            if m:
                try:
                    st = os.lstat(self.dir / n)
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) == (live.st_dev, live.st_ino):
                    return int(m.group(1))
        return None

    def switch(self, version: int) -> None:
        staged = self.staged(version)
        if _same_inode(staged, self.path):
            return
        with fsutil.os_errors(self.path, "switch"):
            if os.path.lexists(self.path):
                if self.is_key and os.path.lexists(self.prev) and os.lstat(self.prev).st_nlink == 1:
                    fsutil.secure_delete(self.prev)  # its last name: zero the old key, don't just drop it
                _link_over(self.path, self.prev, follow=False)
            _link_over(staged, self.path, follow=True)
        fsutil.fsync_dir(self.dir)

    def prune(self, keep: set[int]) -> None:
        fsutil.remove_stale_temps(self.dir, self._temp_prefixes)
        live = self.live_version()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for n in names:
            m = self._staged_re.fullmatch(n)
            if not m or int(m.group(1)) in keep or int(m.group(1)) == live:
                continue
            staged = self.dir / n
            if _same_inode(self.prev, staged):  # the backup is this pruned version: it goes too
                with fsutil.os_errors(self.prev, "remove"):
                    os.unlink(self.prev)
            if self.is_key:
                fsutil.secure_delete(staged)
            else:
                with fsutil.os_errors(staged, "remove"):
                    os.unlink(staged)
        fsutil.fsync_dir(self.dir)

    def check(self, version: int, bundle: Bundle) -> list[str]:
        return _drift(self.path, self._want(bundle))

    def destroy_keys(self, keys: Collection[bytes]) -> list[Path]:
        if not self.is_key:
            return []
        fsutil.remove_stale_temps(self.dir, self._temp_prefixes)
        try:
            names = sorted(n for n in os.listdir(self.dir) if self._staged_re.fullmatch(n))
        except FileNotFoundError:
            return []
        victims = [p for p in (self.prev, *(self.dir / n for n in names))
                   if os.path.lexists(p) and not _same_inode(p, self.path) and _holds_any(p, keys)]
        # A staged copy and .certd-prev may share an inode: drop the extra names first so that
        # secure_delete of the last one zeroes the data instead of only unlinking it.
        last: dict[tuple[int, int], Path] = {}
        with fsutil.os_errors(self.dir, "remove key copies in"):
            for p in victims:
                st = os.lstat(p)
                other = last.get((st.st_dev, st.st_ino))
                if other is not None:
                    os.unlink(other)
                last[(st.st_dev, st.st_ino)] = p
        for p in last.values():
            fsutil.secure_delete(p)
        fsutil.fsync_dir(self.dir)
        return victims


def _link_over(src: Path, dst: Path, *, follow: bool) -> None:
    """Give ``src``'s inode the name ``dst`` atomically: hard link to a temp name, rename over."""
    tmp = dst.with_name(fsutil.temp_name(dst.name))
    os.link(src, tmp, follow_symlinks=follow)
    try:
        os.rename(tmp, dst)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _targets(cert: CertificateConfig) -> list[_Target]:
    d = cert.deploy
    gid = _gid(d.group, cert.name, "deploy.group")
    key_mode = 0o600 if gid == -1 else 0o640
    targets: list[_Target] = []
    if d.live_dir is not None:
        targets.append(_LiveDir(d.live_dir, gid))
    if d.combined is not None:
        targets.append(_PlainFile(d.combined, "combined", key_mode, -1, gid))
    for i, f in enumerate(d.files):
        is_key = f.content in KEY_CONTENTS
        fgid = _gid(f.group, cert.name, f"deploy.files[{i}].group") if f.group else (gid if is_key else -1)
        mode = f.mode if f.mode is not None else (0o644 if not is_key else 0o600 if fgid == -1 else 0o640)
        targets.append(_PlainFile(f.path, f.content, mode, _uid(f.owner, cert.name, i), fgid))
    return targets


def _gid(group: str | None, name: str, key: str) -> int:
    if group is None:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"certificate {name}: {key}: no such group {group!r}; create it or change the configuration") from None


def _uid(owner: str | None, name: str, index: int) -> int:
    if owner is None:
        return -1
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(f"certificate {name}: deploy.files[{index}].owner: no such user {owner!r}; create it or change the configuration") from None


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
