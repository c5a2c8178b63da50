"""The stores the contract suite runs against. Adding an implementation is one entry in
:data:`BACKENDS`: a function that opens the store for a node on fresh, shared data and
returns an opener for more nodes (another process, another host) on that same data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certd.core.clock import FakeClock
from certd.store.files import FileStore
from certd.store.memory import MemoryStore

#: (tmp_path, clock) -> opener(node) -> a store; each call of the opener is another client.
Opener = Callable[[str], Any]


@contextmanager
def files(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    yield lambda node: FileStore(tmp_path / "state", node=node, clock=clock)


@contextmanager
def memory(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    first = MemoryStore(clock=clock, node="node1")
    yield first.handle


BACKENDS: dict[str, Callable[[Path, FakeClock], Any]] = {
    "files": files,
    "memory": memory,
    # "postgres": postgres,   # the fleet issue: a private cluster per session (see TESTENV.md)
}
