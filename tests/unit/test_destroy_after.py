"""destroy_after: a retired version's key (neither current nor what a rollback needs) is destroyed
once it has been retired that long, with a key_destroyed record naming its SPKI hash; the
current and previous versions' keys are never touched. Fake CA, edges and clock; a real FileStore."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock
from certd.core.errors import UsageError
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.destruction import RETIRED_AT, destroy_retired_keys, kept_for_rollback, pass_interval
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.renew import Renew
from certd.engine.rollback import Rollback
from certd.store.files import FileStore
from tests.support.certs import CA, make_ca
from tests.unit.test_usecases import FakeCA, FakeEdges

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
CRITICAL = (("key_type", "default"), ("reuse_key", "default"), ("max_key_age", "default"),
            ("renew_before", "default"), ("keep_versions", "default"), ("destroy_after", "key_class critical"))
CERT = CertificateConfig("www", ("www.example.test",), key_class="critical", destroy_after=60.0, origins=CRITICAL)


@dataclass
class World:
    ports: Ports
    planner: Planner
    edges: FakeEdges
    clock: FakeClock
    store: FileStore
    events: list[LifecycleEvent]

    def renew(self, cert: CertificateConfig = CERT) -> None:
        assert Renew(self.ports, self.planner)(RenewRequest(cert, force=True)).result == Result.RENEWED

    def destroyed(self) -> list[LifecycleEvent]:
        return [e for e in self.events if e.kind == "key_destroyed"]

    def key_file(self, version: int) -> Path:
        return self.store.root / "certs" / "www" / "versions" / f"{version:04d}" / "privkey.pem"


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca(now=NOW)


@pytest.fixture
def world(tmp_path: Path, ca: CA) -> World:
    clock = FakeClock(NOW)
    store = FileStore(tmp_path / "state")
    issuer, edges, bus = FakeCA(ca, clock), FakeEdges(store), EventBus()
    seen: list[LifecycleEvent] = []
    bus.subscribe(seen.append)
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                    AcmeConfig("https://127.0.0.1:14000/dir"), (CERT,))
    ports = Ports(config, store, store, lambda: issuer, bus, clock, edges)
    return World(ports, Planner(store, clock, lambda: issuer), edges, clock, store, seen)


def test_a_retired_key_is_destroyed_after_destroy_after_and_the_record_names_its_spki(world: World) -> None:
    """v1 retires when v3 commits, is kept 60 s, then its key file goes and history gets its SPKI."""
    for _ in range(3):
        world.renew()
    assert world.store.load_info("www", 1).meta[RETIRED_AT] and world.destroyed() == []
    spki1, key1 = world.store.load_info("www", 1).info.spki_sha256, world.store.load("www", 1).bundle.key_pem
    world.clock.advance(timedelta(seconds=59))
    assert destroy_retired_keys(world.ports, CERT) == [] and world.key_file(1).exists()
    world.clock.advance(timedelta(seconds=1))
    with world.store.lock("www"):
        assert destroy_retired_keys(world.ports, CERT) == [1]
    assert not world.key_file(1).exists() and world.key_file(2).exists() and world.key_file(3).exists()
    [ev] = world.destroyed()
    assert (ev.version, ev.spki_sha256, ev.outcome) == (1, spki1, "success")
    assert ev.reason == "destroy_after 1m (key_class critical)" and ev.old_serial
    assert world.edges.destroyed == [key1]  # its deployed copies too
    assert world.store.load("www", 1).meta["key_destroyed"] is True  # the certificate and meta stay


def test_a_commit_after_destroy_after_destroys_without_a_separate_pass(world: World) -> None:
    """The pass runs after every commit: the fourth renewal destroys v1 (retired at the third)."""
    for _ in range(3):
        world.renew()
    world.clock.advance(timedelta(minutes=2))
    world.renew()
    assert [e.version for e in world.destroyed()] == [1]
    assert kept_for_rollback(world.ports, "www") == {3, 4}
    assert world.store.load_info("www", 2).meta[RETIRED_AT]  # retired now, destroyed later


def test_rollback_to_the_previous_version_still_works_and_a_destroyed_one_is_refused(world: World) -> None:
    """The previous version's key is kept for rollback; a version whose key went cannot be deployed."""
    for _ in range(3):
        world.renew()
    world.clock.advance(timedelta(minutes=2))
    world.renew()
    rollback = Rollback(world.ports, world.planner)
    assert rollback(CERT).result == Result.SWITCHED and world.store.current("www") == 3
    with pytest.raises(UsageError, match="version 1's private key was destroyed"):
        rollback(CERT, to_version=1)


def test_a_rollback_target_loses_its_retirement_mark(world: World) -> None:
    """A retired version rolled back to is in service again: its mark goes, its clock starts anew."""
    for _ in range(3):
        world.renew()
    assert world.store.load_info("www", 1).meta.get(RETIRED_AT)
    assert Rollback(world.ports, world.planner)(CERT, to_version=1).result == Result.SWITCHED
    assert world.store.load_info("www", 1).meta.get(RETIRED_AT) is None
    world.clock.advance(timedelta(hours=1))
    with world.store.lock("www"):
        destroy_retired_keys(world.ports, CERT)
    assert world.key_file(1).exists()
    assert [e.version for e in world.destroyed()] == [2]  # neither current (1) nor what the rollback replaced (3)


def test_a_reused_key_still_in_use_keeps_its_deployed_copies(world: World) -> None:
    """With reuse_key, v1's stored copy goes, but the deployed files (the kept versions' key) stay."""
    reuse = CertificateConfig("www", ("www.example.test",), reuse_key=True, destroy_after=60.0)
    for _ in range(3):
        world.renew(reuse)
    world.clock.advance(timedelta(minutes=2))
    with world.store.lock("www"):
        assert destroy_retired_keys(world.ports, reuse) == [1]
    [ev] = world.destroyed()
    assert ev.detail["key_still_in_versions"] == [2, 3] and ev.detail["deployed_copies"] == 0
    assert ev.reason == "destroy_after 1m"  # no key class: no rule suffix
    assert world.edges.destroyed == []


def test_without_destroy_after_nothing_is_marked_or_destroyed(world: World) -> None:
    """A certificate without destroy_after keeps its retired keys until keep_versions prunes them."""
    plain = CertificateConfig("www", ("www.example.test",))
    for _ in range(4):
        world.renew(plain)
        world.clock.advance(timedelta(days=1))
    assert destroy_retired_keys(world.ports, plain) == []
    assert all(RETIRED_AT not in world.store.load_info("www", v).meta for v in world.store.versions("www"))
    assert world.destroyed() == []


def test_the_daemon_pass_interval_follows_the_shortest_destroy_after(tmp_path: Path) -> None:
    """A quarter of the shortest destroy_after, kept within 1 s .. 1 h."""
    def cfg(*values: float | None) -> Config:
        return Config(tmp_path / "c.toml", DaemonConfig(), AcmeConfig("https://127.0.0.1:14000/dir"),
                      tuple(CertificateConfig(f"c{i}", ("a.example.test",), destroy_after=v)
                            for i, v in enumerate(values)))
    assert pass_interval(cfg()) == pass_interval(cfg(None)) == 3600.0
    assert pass_interval(cfg(7 * 86400.0, 600.0)) == 150.0
    assert pass_interval(cfg(1.0)) == 1.0


def test_an_unfinished_rotation_keeps_both_its_versions(world: World) -> None:
    """A rotation a crash left half-done still needs its new version's key when it is resumed."""
    from certd.core import rotation
    for _ in range(3):
        world.renew()
    j = rotation.start("www", "rollback", 3, 1, world.clock.now(), initiator="test", reason="crash")
    world.store.save_journal("www", j.to_json())
    assert kept_for_rollback(world.ports, "www") == {1, 2, 3}
    world.clock.advance(timedelta(hours=1))
    with world.store.lock("www"):
        assert destroy_retired_keys(world.ports, CERT) == []
    assert world.key_file(1).exists()
