"""The stores the contract suite runs against. Adding an implementation is one entry in
:data:`BACKENDS`: a function that opens the store for a node on fresh, shared data and
returns an opener for more nodes (another process, another host) on that same data. A backend
that needs pytest fixtures names them in its ``fixtures`` attribute; they are passed by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certd.core.clock import FakeClock
from certd.crypto.custody import FileKek, KeyRing
from certd.store.files import FileStore
from certd.store.memory import MemoryStore

KEK_SECRET = bytes(range(32))

#: (tmp_path, clock) -> opener(node) -> a store; each call of the opener is another client.
Opener = Callable[[str], Any]


@contextmanager
def files(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    yield lambda node: FileStore(tmp_path / "state", node=node, clock=clock)


@contextmanager
def sealed_files(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    """FileStore with [keys]: every key sealed at rest under one KEK (each opener a process that
    read the same KEK file)."""
    yield lambda node: FileStore(tmp_path / "state", node=node, clock=clock,
                                 keyring=KeyRing(FileKek(KEK_SECRET, "kek")))


@contextmanager
def memory(tmp_path: Path, clock: FakeClock) -> Iterator[Opener]:
    first = MemoryStore(clock=clock, node="node1")
    yield first.handle


@contextmanager
def postgres(tmp_path: Path, clock: FakeClock, *, postgres: str) -> Iterator[Opener]:
    """PgStore on a fresh database of the session's private cluster (tests/support/postgres.py);
    each opener call is another client with its own connections, all sealing under one KEK (a
    shared database refuses plain keys). The fake clock's "now" goes to every query."""
    from certd.store.pg import PgStore
    opened: list[PgStore] = []

    def open_node(node: str) -> PgStore:
        opened.append(PgStore(postgres, node=node, clock=clock, keyring=KeyRing(FileKek(KEK_SECRET, "kek"))))
        return opened[-1]
    try:
        yield open_node
    finally:
        for store in opened:
            store.close()


postgres.fixtures = ("postgres",)  # type: ignore[attr-defined]

BACKENDS: dict[str, Callable[[Path, FakeClock], Any]] = {
    "files": files,
    "sealed_files": sealed_files,
    "memory": memory,
    "postgres": postgres,
}
