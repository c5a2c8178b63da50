"""The engine's writes of a certificate's state are compare-and-set changes, never blind saves:
two writers that touch different fields (the planner's ARI cache, a renewal's failure record)
both survive however they interleave, and concurrent writers lose no update."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from certd.acme.ari import RenewalInfo
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock
from certd.core.errors import StoreError
from certd.core.events import EventBus
from certd.engine.attempts import CertState
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.renew import Renew
from certd.engine.rotations import Rotations
from certd.engine.statebook import StateBook
from certd.store.files import FileStore
from certd.store.memory import MemoryStore
from certd.store.port import Lease
from tests.support.certs import CA, make_ca
from tests.unit.test_usecases import FakeCA, FakeEdges

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
CERT = CertificateConfig("www", ("www.example.test",))


class AriCA(FakeCA):
    """A CA with ARI; ``during_ari`` runs while the CA is being asked (another writer's turn)."""

    during_ari: Callable[[], None] | None = None

    def renewal_info(self, cert_pem: bytes) -> RenewalInfo:  # type: ignore[override]
        if self.during_ari is not None:
            self.during_ari()
        now = self.clock.now()
        return RenewalInfo(now + timedelta(days=20), now + timedelta(days=21), None, None)


def _ports(store: FileStore | MemoryStore, issuer: FakeCA, clock: FakeClock, tmp_path: Path) -> Ports:
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                    AcmeConfig("https://127.0.0.1:14000/dir"), (CERT,))
    return Ports(config, store, store, lambda: issuer, EventBus(), clock, FakeEdges(store))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca(now=NOW)


@pytest.fixture(params=["files", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FileStore | MemoryStore:
    return FileStore(tmp_path / "state") if request.param == "files" else MemoryStore()


def _renewed(store: FileStore | MemoryStore, ca: CA, tmp_path: Path) -> tuple[Ports, Planner, AriCA]:
    """A store holding a committed version 1 of ``www``; the renewal's ports and planner."""
    clock = FakeClock(NOW)
    issuer = AriCA(ca, clock)
    ports = _ports(store, issuer, clock, tmp_path)
    planner = Planner(store, clock, lambda: issuer)
    assert Renew(ports, planner)(RenewRequest(CERT)).result == Result.RENEWED
    return ports, planner, issuer


def test_a_failure_recorded_while_the_planner_asks_ari_survives_the_ari_write(
        store: FileStore | MemoryStore, ca: CA, tmp_path: Path) -> None:
    """The planner read the state, a renewal records a failure meanwhile: the ARI write keeps it."""
    ports, renewal_planner, issuer = _renewed(store, ca, tmp_path)
    other = Planner(store, ports.clock, lambda: issuer)  # another process's planner
    rotations = Rotations(ports, renewal_planner)

    def failure() -> None:
        rotations.record_failure(CERT, renewal_planner.load_state("www"), "issuing www: boom")
    issuer.during_ari = failure
    stored = store.load_info("www", 1)
    other.decide(CERT, stored, other.load_state("www"), refresh_ari=True)

    state = CertState.from_json(store.read_state("www")[0])
    assert (state.failures, state.last_result) == (1, "failed")
    assert state.retry_after is not None and state.ari is not None and state.ari["serial"] == stored.info.serial


def test_an_ari_cache_written_while_a_renewal_fails_survives_the_failure_record(
        store: FileStore | MemoryStore, ca: CA, tmp_path: Path) -> None:
    """A renewal read the state, another planner caches ARI meanwhile: the failure record keeps it."""
    ports, renewal_planner, issuer = _renewed(store, ca, tmp_path)
    stale = renewal_planner.load_state("www")
    other = Planner(store, ports.clock, lambda: issuer)
    other.decide(CERT, store.load_info("www", 1), other.load_state("www"), refresh_ari=True)
    Rotations(ports, renewal_planner).record_failure(CERT, stale, "issuing www: boom")

    state = CertState.from_json(store.read_state("www")[0])
    assert state.failures == 1 and state.ari is not None and state.ari.get("start")


def test_the_callers_state_sees_what_was_written(store: FileStore | MemoryStore, ca: CA, tmp_path: Path) -> None:
    """After a failure record the caller's CertState is the merged state (its message uses it)."""
    ports, planner, _ = _renewed(store, ca, tmp_path)
    state = planner.load_state("www")
    store.write_state("www", {**store.read_state("www")[0], "failures": 4}, expected=store.read_state("www")[1])
    Rotations(ports, planner).record_failure(CERT, state, "issuing www: boom")
    assert state.failures == 5 == CertState.from_json(store.read_state("www")[0]).failures


# -- many writers: no update lost -------------------------------------------------------------

ROUNDS = 25


def _hammer(state_dir: str, ca: CA, tmp: str, writer: int) -> None:
    """One writer (a thread or a process of its own): failure records, or ARI cache writes."""
    store = FileStore(Path(state_dir))
    clock = FakeClock(NOW)
    issuer = AriCA(ca, clock)
    ports = _ports(store, issuer, clock, Path(tmp))
    planner = Planner(store, clock, lambda: issuer)
    rotations = Rotations(ports, planner)
    for i in range(ROUNDS):
        if writer % 2:
            rotations.record_failure(CERT, planner.load_state("www"), f"writer {writer} failure {i}")
        else:
            clock.advance(timedelta(days=1))  # every look finds the cache stale: a write each time
            planner.decide(CERT, store.load_info("www", 1), planner.load_state("www"), refresh_ari=True)


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_writers_hammering_one_state_lose_no_update(how: str, ca: CA, tmp_path: Path) -> None:
    """Four writers on one FileStore (threads, or processes): every failure is counted, ARI kept."""
    store = FileStore(tmp_path / "state")
    _renewed(store, ca, tmp_path)
    args = [(str(tmp_path / "state"), ca, str(tmp_path), w) for w in range(4)]
    if how == "threads":
        workers: list[threading.Thread | multiprocessing.process.BaseProcess] = \
            [threading.Thread(target=_hammer, args=a) for a in args]
    else:
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=_hammer, args=a) for a in args]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert not w.is_alive()
        assert getattr(w, "exitcode", 0) == 0
    state = CertState.from_json(store.read_state("www")[0])
    assert state.failures == 2 * ROUNDS
    assert state.ari is not None and state.ari.get("start")


class FullMemory(MemoryStore):
    """A MemoryStore whose state writes fail while ``full`` (a full disk)."""

    full = False

    def write_state(self, name: str, state: dict[str, object], *, expected: str | None,
                    lease: Lease | None = None) -> str:
        if self.full:
            raise StoreError(f"writing the state of {name}: [Errno 28] No space left on device")
        return super().write_state(name, state, expected=expected, lease=lease)


def test_a_change_that_could_not_be_written_is_kept_and_the_next_change_builds_on_it() -> None:
    """Issue 11's floor under compare-and-set: a lost write is read back, and later changes add to it."""
    store = FullMemory()
    book = StateBook(store)
    store.full = True
    with pytest.raises(StoreError):
        book.update("www", lambda s: setattr(s, "failures", s.failures + 1))
    assert store.read_state("www")[0] is None and book.load("www").failures == 1
    store.full = False
    book.update("www", lambda s: setattr(s, "failures", s.failures + 1))
    assert CertState.from_json(store.read_state("www")[0]).failures == 2 == book.load("www").failures
