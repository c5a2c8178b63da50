"""Two fleet nodes over one MemoryStore with a fake clock: a node that stored a renewal's version
and died before its rotation committed (S1 — one certificate per renewal, FLEET.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Collection

import pytest
from cryptography.hazmat.primitives import serialization

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.manager import Manager
from certd.store.memory import MemoryStore
from tests.support.certs import make_leaf, shared_ca

CERT = CertificateConfig("www", ("www.example.test",))
START = datetime(2026, 11, 1, tzinfo=timezone.utc)


class Died(BaseException):
    """The node's process ends here (SIGKILL): nothing after it runs, no handler catches it."""


@dataclass
class CA:
    """Signs what it is handed, valid from the fake clock's now; counts orders."""

    clock: FakeClock
    orders: int = 0

    def issue(self, cert: Any, key_pem: bytes, *, replaces: str | None = None, progress: Any = None,
              on_order: Any = None, before: Any = None) -> bytes:
        self.orders += 1
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = make_leaf(shared_ca(), cert.domains, key=key, not_before=self.clock.now())  # type: ignore[arg-type]
        return leaf.bundle.fullchain_pem

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def close(self) -> None:
        pass


@dataclass
class DyingEdges:
    """Edges whose switch kills the node (for the versions in ``die_at``); everything else succeeds."""

    store: Any
    die_at: set[int] = field(default_factory=set)
    switched: list[int] = field(default_factory=list)
    lost_ack: set[int] = field(default_factory=set)  # commits the store takes and whose reply is lost

    def check_safe(self, cert: CertificateConfig) -> None:
        pass

    def effects(self, cert: CertificateConfig, *, repair: bool = False) -> DyingEdges:
        return self

    def prune(self, cert: CertificateConfig, keep: Collection[int]) -> None:
        pass

    def destroy_keys(self, cert: CertificateConfig, keys: Collection[bytes], *,
                     spkis: Collection[str] = ()) -> list[Path]:
        return []

    def stage(self, version: int) -> None:
        pass

    def switch(self, version: int) -> None:
        if version in self.die_at:
            raise Died()
        self.switched.append(version)

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        return []

    def verify(self, version: int) -> bool:
        return True

    def commit(self, version: int) -> None:
        self.store.set_current(CERT.name, version)
        if version in self.lost_ack:
            raise StoreUnreachable("PostgreSQL store: database unreachable: server closed the connection")


@dataclass
class Node:
    manager: Manager
    edges: DyingEdges
    events: list[LifecycleEvent]


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[MemoryStore, CA, FakeClock]:
    clock = FakeClock(START)
    return MemoryStore(clock=clock, node="node1"), CA(clock), clock


def node(tmp_path: Path, data: MemoryStore, ca: CA, clock: FakeClock, name: str) -> Node:
    store = data.handle(name)
    events: list[LifecycleEvent] = []
    bus = EventBus()
    bus.subscribe(events.append)
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / name), AcmeConfig("https://p.test/dir"),
                 (CERT,))
    m = Manager(cfg, store=store, issuer=ca, clock=clock, events=bus)  # type: ignore[arg-type]
    edges = DyingEdges(store)
    m.ports = replace(m.ports, edges=edges)
    return Node(m, edges, events)


def died_after_storing(tmp_path: Path, data: MemoryStore, ca: CA, clock: FakeClock) -> Node:
    """node1 issued version 1, then, when version 1 was due, stored version 2 and died switching to it."""
    one = node(tmp_path, data, ca, clock, "node1")
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    clock.advance(timedelta(days=70).total_seconds())  # 2/3 of 90 days: due
    one.edges.die_at.add(2)
    with pytest.raises(Died):
        one.manager.renew_one(CERT)
    assert data.versions("www") == [1, 2] and data.desired("www") == 1
    return one


def test_the_next_node_rolls_out_the_version_a_dead_node_stored_instead_of_ordering_again(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """node1 stored version 2 and died before committing it: node2's scheduled renewal rolls version 2 out (no second order), audits whose it was, and node1 finds nothing to resume when it returns."""
    data, ca, clock = fleet
    died_after_storing(tmp_path, data, ca, clock)
    two = node(tmp_path, data, ca, clock, "node2")
    out = two.manager.renew_one(CERT)
    assert out.result == "renewed", out.message
    assert ca.orders == 2, "one certificate per renewal: node2 ordered nothing"
    assert (data.versions("www"), data.desired("www"), data.applied("node2", "www")) == ([1, 2], 2, 2)
    assert two.edges.switched == [2]
    adopted = [e for e in two.events if e.kind == "version_adopted"]
    assert len(adopted) == 1 and adopted[0].detail["stored_by"] == "node1" and adopted[0].version == 2
    # node1 comes back: nothing to resume; its reconciler re-applies the desired version (applied forgotten)
    assert data.load_rotation("node1", "www") is None and data.applied("node1", "www") is None
    back = node(tmp_path, data, ca, clock, "node1")
    assert back.manager.recover_all() == []
    assert back.manager.renew_one(CERT).result == "not_due"
    assert data.desired("www") == 2 and ca.orders == 2


def test_a_returning_node_never_moves_the_desired_version_back(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """node1 died mid-rotation to version 2; meanwhile node2 renewed to version 3 (an operator's forced renewal): node1's restart does not finish its stale rotation, and version 3 stays desired."""
    data, ca, clock = fleet
    died_after_storing(tmp_path, data, ca, clock)
    two = node(tmp_path, data, ca, clock, "node2")
    assert two.manager.renew_one(CERT, force=True, reason="operator").result == "renewed"
    assert data.desired("www") == 3
    back = node(tmp_path, data, ca, clock, "node1")
    back.manager.recover_all()
    assert data.desired("www") == 3, "a stale rotation moved the fleet back"
    assert back.edges.switched == []
    journal = data.load_rotation("node1", "www")
    assert journal is not None and journal["step"] == "failed" and "superseded" in journal["error"]


def test_a_dead_nodes_failed_rotation_is_not_adopted(tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """node1's rotation to version 2 was rolling back when it died (version 2 failed there): node2 drops that journal and orders afresh rather than rolling out a version that failed."""
    data, ca, clock = fleet
    died_after_storing(tmp_path, data, ca, clock)
    raw = data.load_rotation("node1", "www")
    assert raw is not None
    raw.update(step="rolling_back", error="verify of version 2 failed")
    with data.lock("www"):
        data.save_rotation("node1", "www", raw)
    two = node(tmp_path, data, ca, clock, "node2")
    assert two.manager.renew_one(CERT).result == "renewed"
    assert ca.orders == 3 and data.desired("www") == 3
    assert data.load_rotation("node1", "www") is None


def test_a_commit_whose_reply_was_lost_is_finished_and_audited_not_dropped(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """node1's commit of version 2 reached the store but its reply did not (PostgreSQL stopping):
    version 2 is desired, node1's journal stays short of ``committed`` and no 'renewed' was recorded.
    node2, finishing what node1 left, rolls version 2 out and records the renewal, ordering
    nothing; it used to drop that journal as stale ("version 2 is desired now"), and the fleet
    soak counted fewer renewals than orders."""
    data, ca, clock = fleet
    one = node(tmp_path, data, ca, clock, "node1")
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    clock.advance(timedelta(days=70).total_seconds())
    one.edges.lost_ack.add(2)
    assert one.manager.renew_one(CERT).result != "renewed"
    raw = data.load_rotation("node1", "www")
    assert data.desired("www") == 2 and raw is not None and raw["step"] != "committed"
    two = node(tmp_path, data, ca, clock, "node2")
    out = two.manager.resume_order(CERT, initiator="node=node2")
    assert out.result == "renewed", out.message
    assert ca.orders == 2, "one certificate per renewal"
    assert [e.version for e in one.events + two.events if e.kind == "renewed"] == [1, 2]
    assert data.load_rotation("node1", "www") is None and data.desired("www") == 2
