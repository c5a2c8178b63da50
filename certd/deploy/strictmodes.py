"""OpenSSH-style StrictModes: refuse deploy directories and hook programs others could swap.

certd's descriptor-based file operations (:mod:`certd.deploy.files`) hold even in a directory
someone else can write, but a user who can rename entries in a deploy directory, or in any of
its parents, can still replace what TLS servers read. So, as OpenSSH does with
``~/.ssh/authorized_keys``, a deploy directory is **unsafe** when it, or any parent up to ``/``,
is writable by a user other than root or certd's own (effective) user:

- owned by another user;
- group-writable, for a group other than root's (0) or certd's (effective gid);
- writable by others.

A root-owned directory with the sticky bit (``/tmp``) is safe: in it nobody else can rename or
remove what root or certd created. Both the path as written and the path with symlinks resolved
are checked. POSIX ACLs are not looked at (docs/SECURITY.md).

An unsafe deploy directory is a ``check-config`` error and a refusal to deploy (the certificate
shows ``broken``), unless the certificate sets ``insecure_shared_deploy_dir = true``: then it
is a loud warning. When certd runs as root, the same rule applies to each hook's program and
its directories (a program another user can replace would run as root): a ``check-config``
error, a refusal to deploy (so the hooks never run) and state ``broken``.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from certd.config import CertificateConfig, Config
from certd.core.errors import StoreError

log = logging.getLogger("certd.strictmodes")
_warned: set[str] = set()   # one warning per unsafe directory per process, not one per file operation


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def why_unsafe(st: os.stat_result, euid: int, egid: int) -> str | None:
    """Why a directory (or program) with this stat is writable by someone else; None if safe."""
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return None  # /tmp: root-owned and sticky
    if st.st_uid not in (0, euid):
        return f"owned by {_user(st.st_uid)}"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, egid):
        return f"writable by group {_group(st.st_gid)}"
    if st.st_mode & stat.S_IWOTH:
        return "writable by everyone"
    return None


def _chain(path: Path) -> list[Path]:
    """``path`` (or its nearest existing ancestor) and every parent up to ``/``, both as written
    and with symlinks resolved."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    out: list[Path] = []
    for p in (path, Path(os.path.realpath(path))):
        while True:
            if p not in out:
                out.append(p)
            if p == p.parent:
                break
            p = p.parent
    return out


def unsafe_path(path: Path, *, what: str) -> str | None:
    """The first component of ``path``'s chain someone else can write, as one line; None if safe."""
    euid, egid = os.geteuid(), os.getegid()
    for p in _chain(path):
        try:
            st = os.lstat(p)  # a symlink itself is judged by its directory and its target
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        why = why_unsafe(st, euid, egid)
        if why is not None:
            detail = f"{what} {path}" if p == path else f"{what} {path}: its parent {p}"
            return (f"{detail} is {why} (mode {stat.S_IMODE(st.st_mode):04o}, owner "
                    f"{_user(st.st_uid)}:{_group(st.st_gid)}), so another user could swap what certd "
                    f"writes there; fix: chown root:root {p} && chmod go-w {p}")
    return None


def deploy_dirs(cert: CertificateConfig) -> list[Path]:
    d = cert.deploy
    paths = [p for p in (d.live_dir, d.combined, *(f.path for f in d.files)) if p is not None]
    out: list[Path] = []
    for p in paths:
        if p.parent not in out:
            out.append(p.parent)
    return out


def certificate_problems(cert: CertificateConfig) -> list[str]:
    """One line per unsafe deploy directory of ``cert`` (whatever insecure_shared_deploy_dir says)."""
    out = []
    for d in deploy_dirs(cert):
        why = unsafe_path(d, what="deploy directory")
        if why is not None:
            out.append(f"certificate {cert.name}: {why}, or set insecure_shared_deploy_dir = true "
                       f"for this certificate (docs/SECURITY.md)")
    return out


def hook_programs(cert: CertificateConfig) -> list[str]:
    progs = []
    for h in cert.reload:
        if h.kind == "command" and h.command:
            progs.append(h.command[0])
        elif h.kind == "nginx":
            progs.append(h.binary)
    for hook in (cert.dns01_hook, cert.dns_persist_hook):
        if hook:
            progs.append(hook[0])
    return progs


def hook_problems(cert: CertificateConfig) -> list[str]:
    """When certd runs as root: one line per hook program another user could replace."""
    if os.geteuid() != 0:
        return []
    out = []
    for prog in hook_programs(cert):
        found = shutil.which(prog) if "/" not in prog else prog
        if found is None:
            continue  # a missing program is reported when the hook runs
        why = unsafe_path(Path(found), what="hook program")
        if why is not None:
            out.append(f"certificate {cert.name}: {why} (certd runs as root and would run it as root)")
    return out


def config_report(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) for ``check-config``: unsafe deploy directories are errors unless the
    certificate sets insecure_shared_deploy_dir (then warnings); unsafe hook programs are errors."""
    errors: list[str] = []
    warnings: list[str] = []
    for cert in cfg.certificates:
        dirs = certificate_problems(cert)
        (warnings if cert.insecure_shared_deploy_dir else errors).extend(dirs)
        errors.extend(hook_problems(cert))
    errors.extend(keys_problems(cfg))
    return errors, warnings


def keys_problems(cfg: Config) -> list[str]:
    """KEK files (and the PKCS#11 module and PIN file) another user could swap: a swapped KEK
    would seal the next keys under a key that user holds. Always an error."""
    keys = cfg.keys
    if keys is None:
        return []
    files = [(keys.kek_file, "KEK file"), (keys.pkcs11_module, "PKCS#11 module"),
             (keys.pkcs11_pin_file, "PKCS#11 PIN file"), *((p, "old KEK file") for p in keys.old_kek_files)]
    return [w for path, what in files if path is not None and (w := unsafe_path(path, what=what)) is not None]


def require_safe(cert: CertificateConfig) -> None:
    """Refuse (StoreError, one line) to deploy ``cert`` into a directory others can write, or
    log a loud warning when the certificate sets insecure_shared_deploy_dir. As root, a hook
    program another user could replace is always refused: the switch would run it as root."""
    hooks = hook_problems(cert)
    if hooks:
        raise StoreError(f"refusing to deploy: {hooks[0]}")
    problems = certificate_problems(cert)
    if not problems:
        return
    if cert.insecure_shared_deploy_dir:
        for p in problems:
            if p not in _warned:
                _warned.add(p)
                log.warning("INSECURE (insecure_shared_deploy_dir = true): %s", p)
        return
    raise StoreError(f"refusing to deploy: {problems[0]}")


def iter_unsafe(paths: Iterable[Path], what: str) -> list[str]:
    return [w for p in paths if (w := unsafe_path(p, what=what)) is not None]
