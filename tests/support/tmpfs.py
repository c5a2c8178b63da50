"""A tiny tmpfs to make real ENOSPC and EROFS happen (needs root and CAP_SYS_ADMIN).

    with small_tmpfs(tmp_path / "mnt") as mnt: ...      # 64 KiB, unmounted afterwards
    fill(mnt)                                            # now every write there fails ENOSPC
    remount_ro(mnt)                                      # now every write fails EROFS
    remount_rw(mnt)                                      # writable again
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """Mount a ``size`` tmpfs on ``path`` for the block; skip the test if mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(mount: Path) -> None:
    """Write a filler file until the filesystem reports ENOSPC."""
    fd = os.open(mount / ".filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def remount_ro(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)


def remount_rw(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True, capture_output=True)
