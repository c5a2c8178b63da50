"""The one place certd calls ``fsync``: :func:`fsync`, and :func:`counting`, which lets a test
or the benchmark count (and name) the fsyncs a piece of work makes.

Why a seam: fsyncs are most of what a rotation costs on a real disk (issue 20: 36 of them, a
third of the time), and each one is there for a crash guarantee
(docs/PERFORMANCE.md, "Which writes a crash must find"). A count that can be asserted keeps
new ones from creeping in unnoticed; the names say which write a new one belongs to.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["FsyncCount", "counting", "fsync"]


@dataclass
class FsyncCount:
    """What :func:`counting` saw: every fsync of the process while it was active, in order,
    named by the path the descriptor had (``?`` when it could not be read)."""

    paths: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        """One line per path (temporary names folded), most frequent first: for failure messages."""
        folded = Counter(_fold(p) for p in self.paths)
        return "\n".join(f"{n:3d}  {p}" for p, n in folded.most_common())


_active: list[FsyncCount] = []
_lock = threading.Lock()


def fsync(fd: int) -> None:
    """``os.fsync(fd)``, counted while :func:`counting` is active (OSError as os.fsync)."""
    if _active:  # a list's truth without the lock: counting is for tests and benchmarks only
        _record(fd)
    os.fsync(fd)


def _record(fd: int) -> None:
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = "?"
    with _lock:
        for count in _active:
            count.paths.append(path)


@contextmanager
def counting() -> Iterator[FsyncCount]:
    """Count every fsync of this process (all threads) during the block."""
    count = FsyncCount()
    with _lock:
        _active.append(count)
    try:
        yield count
    finally:
        with _lock:
            _active.remove(count)


def _fold(path: str) -> str:
    """``dir/.name.tmp-1a2b`` -> ``dir/name (temporary)``, so repeated writes of one file group."""
    head, _, tail = path.rpartition("/")
    if tail.startswith(".") and ".tmp-" in tail:
        tail = tail[1:tail.index(".tmp-")] + " (temporary)"
    return f"{head}/{tail}" if head else tail
