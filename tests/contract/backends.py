"""The stores the contract suite runs against. Adding an implementation is one entry in
:data:`BACKENDS`: a function that opens the store for a node on fresh, shared data and
returns an opener for more nodes (another process, another host) on that same data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certd.core.clock import FakeClock
from certd.crypto.custody import FileKek, KeyRing
from certd.store.files import FileStore
from certd.store.memory import MemoryStore

#: (tmp_path, clock) -> opener(node) -> a store; each call of the opener is another client.
Opener = Callable[[str], Any]


@contextmanager
def files(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    yield lambda node: FileStore(tmp_path / "state", node=node, clock=clock)


@contextmanager
def sealed_files(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    """FileStore with [keys]: every key sealed at rest under one KEK (each opener a process that
    read the same KEK file)."""
    secret = bytes(range(32))
    yield lambda node: FileStore(tmp_path / "state", node=node, clock=clock, keyring=KeyRing(FileKek(secret, "kek")))


@contextmanager
def memory(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    first = MemoryStore(clock=clock, node="node1")
    yield first.handle


BACKENDS: dict[str, Callable[[Path, FakeClock], Any]] = {
    "files": files,
    "sealed_files": sealed_files,
    "memory": memory,
    # "postgres": postgres,   # the fleet issue: a private cluster per session (see TESTENV.md)
}
