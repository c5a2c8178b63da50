"""A real unprivileged user for attack tests, created and removed by the test session.

The security tests run the attacks themselves, as a user who is neither root nor certd's
own user, the way a deploy directory's owner (``www-data``) would. :class:`UnprivUser`
creates that user with ``useradd`` (no home, no login shell), runs programs as it with
``setpriv`` (real and effective ids dropped, supplementary groups cleared, no capabilities),
and removes it with ``userdel`` at the end.

A user can only reach what its path lets it traverse: pytest's ``tmp_path`` lives under a
0700 directory, so :meth:`UnprivUser.workdir` makes a world-traversable directory
(0711, root-owned) under ``/tmp`` for a test's deploy directories. The checkout itself may sit
under a directory only root can enter (CI clones into ``mktemp -d``, 0700), so what the user
runs is reached through :meth:`UnprivUser.readable` and :meth:`UnprivUser.python_path`: hard-linked
(or copied) mirrors under such a directory.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.procs import ManagedProcess

__all__ = ["UnprivUser"]


class UnprivUser:
    """One throw-away system user: ``name``, ``uid``, ``gid``."""

    def __init__(self, prefix: str = "certdatk") -> None:
        if os.geteuid() != 0:
            raise RuntimeError("attack tests create a user and must run as root (CI does)")
        self.name = f"{prefix}{secrets.token_hex(3)}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", self.name],
                       check=True, capture_output=True, text=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self._dirs: list[Path] = []
        self._mirrors: dict[Path, Path] = {}
        self._mirror_root: Path | None = None

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this user: no root ids, no supplementary groups, no capabilities."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--inh-caps=-all", "--", *argv]

    def run(self, argv: Sequence[str], timeout: float = 90,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd="/")

    def python(self, script: Path | str, *args: str) -> list[str]:
        """argv running a Python script as this user (the project's interpreter)."""
        return self.argv([sys.executable, str(script), *args])

    def spawn(self, argv: Sequence[str], log_path: Path) -> ManagedProcess:
        """Start ``argv`` as this user in the background; stopped by PID like any fixture."""
        proc = ManagedProcess(self.argv(argv), log_path=log_path, cwd="/")
        proc.start()
        return proc

    def workdir(self) -> Path:
        """A fresh root-owned 0711 directory under /tmp that this user can traverse."""
        d = Path(tempfile.mkdtemp(prefix="certd-sec-", dir="/tmp"))
        os.chmod(d, 0o711)
        self._dirs.append(d)
        return d

    def owned_dir(self, parent: Path, name: str, mode: int = 0o755) -> Path:
        """A directory ``parent/name`` owned by this user (e.g. a deploy dir www-data owns)."""
        d = parent / name
        d.mkdir(mode=mode)
        os.chown(d, self.uid, self.gid)
        os.chmod(d, mode)
        return d

    def readable(self, src: Path | str) -> Path:
        """A mirror of ``src`` (a file or a tree) that this user can reach and read."""
        src = Path(src).resolve()
        if src not in self._mirrors:
            if self._mirror_root is None:
                self._mirror_root = self.workdir()
                os.chmod(self._mirror_root, 0o755)
            dst = self._mirror_root / f"{len(self._mirrors)}" / src.name
            dst.parent.mkdir(mode=0o755)
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                _link_or_copy(str(src), str(dst))
            self._mirrors[src] = dst
        return self._mirrors[src]

    def python_path(self) -> str:
        """PYTHONPATH giving this user's ``/usr/bin/python3`` the project's packages: the
        venv's site-packages and the ``certd`` package, mirrored where the user can read them."""
        root = Path(__file__).resolve().parents[2]
        return f"{self.readable(sysconfig.get_paths()['purelib'])}:{self.readable(root / 'certd').parent}"

    def remove(self) -> None:
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["userdel", self.name], capture_output=True, text=True)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link ``src`` at ``dst`` (instant, same bytes and mode), or copy it across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
