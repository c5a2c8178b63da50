"""The engine runs unchanged over MemoryStore (the single-host adapter of the seam), with a fake clock."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.manager import Manager
from certd.store.memory import MemoryStore
from tests.support.certs import make_leaf, shared_ca

CERT = CertificateConfig("www", ("www.example.test",))


class SigningCA:
    """An issuer that signs whatever key it is handed, from the shared test CA; counts orders."""

    def __init__(self) -> None:
        self.orders = 0

    def issue(self, cert: Any, key_pem: bytes, *, replaces: str | None = None, progress: Any = None,
              on_order: Any = None, before: Any = None) -> bytes:
        self.orders += 1
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = make_leaf(shared_ca(), cert.domains, key=key)  # type: ignore[arg-type]
        return leaf.bundle.fullchain_pem

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def close(self) -> None:
        pass


def test_renew_and_rollback_over_memory_store(tmp_path: Path) -> None:
    """A forced renewal twice, then a rollback: versions, desired, this node's applied, the
    (cleared) journal and the state all land in MemoryStore, fenced by lock()'s lease."""
    clock = FakeClock(datetime.now(timezone.utc))
    store = MemoryStore(clock=clock, node="host1")
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CERT,))
    ca = SigningCA()
    m = Manager(cfg, store=store, issuer=ca, clock=clock)  # type: ignore[arg-type]
    assert m.renew_one(CERT, force=True).result == "renewed"
    assert m.renew_one(CERT, force=True).result == "renewed"
    assert (store.versions("www"), store.desired("www"), store.applied("host1", "www")) == ([1, 2], 2, 2)
    assert store.load_journal("www") is not None and store.load_journal("www")["step"] == "committed"
    assert store.read_state("www")[0]["last_success"]
    assert m.rollback(CERT).result == "switched"
    assert (store.desired("www"), store.applied("host1", "www")) == (1, 1)
    assert ca.orders == 2 and not (tmp_path / "state").exists()  # nothing touched the disk
    lease = store.lease("www", "other", 60.0)  # every lock() was released
    assert lease.token == 4


class StoreGoneAfterCommit(MemoryStore):
    """A store whose database goes away right after a renewal commits (prune is the next write)."""

    def prune(self, *args: Any, **kwargs: Any) -> list[int]:
        raise StoreUnreachable("PostgreSQL store: database unreachable: no connection within 5 s")


def test_a_committed_renewal_is_audited_even_when_the_store_fails_right_after(tmp_path: Path) -> None:
    """The fleet soak lost a 'renewed' record (99 for 100 committed renewals): PostgreSQL stopped
    between the commit and the housekeeping that ran before the audit record (pruning old
    versions), so the record of a renewal that did happen was never written."""
    clock = FakeClock(datetime.now(timezone.utc))
    store = StoreGoneAfterCommit(clock=clock, node="host1")
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CERT,))
    events = EventBus()
    seen: list[LifecycleEvent] = []
    events.subscribe(seen.append)
    m = Manager(cfg, store=store, issuer=SigningCA(), clock=clock, events=events)  # type: ignore[arg-type]
    m.renew_one(CERT, force=True)  # the first issuance
    m.renew_one(CERT, force=True)
    assert store.desired("www") == 2  # both committed
    assert [e.version for e in seen if e.kind == "renewed"] == [1, 2]
