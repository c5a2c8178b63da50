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
from certd.core.errors import StoreError, StoreUnreachable, VerificationFailed
from certd.core.events import EventBus, LifecycleEvent
from certd.acme import resume
from certd.engine.adopt import orphan_refusal, stored_from
from certd.engine.manager import Manager
from certd.store.memory import MemoryStore
from certd.store.port import OrderJournal, VersionInfo
from tests.support.certs import make_bundle, make_leaf, shared_ca

CERT = CertificateConfig("www", ("www.example.test",))
START = datetime(2026, 11, 1, tzinfo=timezone.utc)
FIRST = AcmeConfig("https://p.test/dir")  # the CA the nodes order from, unless a test changes it


class Died(BaseException):
    """The node's process ends here (SIGKILL): nothing after it runs, no handler catches it."""


@dataclass
class CA:
    """Signs what it is handed, valid from the fake clock's now; counts orders."""

    clock: FakeClock
    orders: int = 0
    revoked: int = 0

    def issue(self, cert: Any, key_pem: bytes, *, replaces: str | None = None, progress: Any = None,
              on_order: Any = None, before: Any = None) -> bytes:
        self.orders += 1
        if on_order is not None:  # as the real issuer: right after newOrder (certd journals the order)
            on_order(f"https://p.test/order/{self.orders}")
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = make_leaf(shared_ca(), cert.domains, key=key, not_before=self.clock.now())  # type: ignore[arg-type]
        return leaf.bundle.fullchain_pem

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def revoke(self, cert_pem: bytes, reason: int) -> None:
        self.revoked += 1

    def close(self) -> None:
        pass


@dataclass
class DyingEdges:
    """Edges whose switch kills the node (for the versions in ``die_at``); everything else succeeds."""

    store: Any
    die_at: set[int] = field(default_factory=set)
    switched: list[int] = field(default_factory=list)
    lost_ack: set[int] = field(default_factory=set)  # commits the store takes and whose reply is lost
    fail_verify: set[int] = field(default_factory=set)

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
        if version in self.fail_verify:
            raise VerificationFailed(f"version {version} is not served")
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


def node(tmp_path: Path, data: MemoryStore, ca: CA, clock: FakeClock, name: str,
         acme: AcmeConfig = FIRST, cert: CertificateConfig = CERT) -> Node:
    """Node ``name`` over ``data``, configured with the CA ``acme`` and the certificate ``cert``."""
    store = data.handle(name)
    events: list[LifecycleEvent] = []
    bus = EventBus()
    bus.subscribe(events.append)
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / name), acme, (cert,))
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


# --- a version stored and nothing else: an orphan (certd/engine/adopt.py) -------------------------


class StoppingStore(MemoryStore):
    """A node's store whose first rotation-journal write ends the node (``stop``): ``Died``
    (SIGKILL), or the database stopping (``StoreUnreachable``, and every write after fails too).
    It keeps the order journals it was given (a power loss may bring one back)."""

    def __init__(self, data: MemoryStore, node: str, stop: type[BaseException] | None) -> None:
        super().__init__(clock=data._clock, node=node, _data=data._d)
        self.stop, self.stopped = stop, False
        self.journals: list[Any] = []

    def save_rotation(self, node: str, name: str, journal: dict[str, Any] | None, *, lease: Any = None) -> None:
        if self.stop is not None and journal is not None:
            self.stopped = True
            raise self.stop("PostgreSQL store: database unreachable: the server stopped") \
                if self.stop is StoreUnreachable else self.stop()
        super().save_rotation(node, name, journal, lease=lease)

    def save_order(self, name: str, order: Any, *, lease: Any = None) -> None:
        if self.stopped:
            raise StoreUnreachable("PostgreSQL store: database unreachable: the server stopped")
        if order is not None:
            self.journals.append(order)
        super().save_order(name, order, lease=lease)


def stored_then_stopped(tmp_path: Path, data: MemoryStore, ca: CA, clock: FakeClock,
                        stop: type[BaseException]) -> Node:
    """node1 issued version 1; when it was due, stored version 2 and stopped (``stop``) writing its rotation's first journal step."""
    one = node(tmp_path, data, ca, clock, "node1")
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    clock.advance(timedelta(days=70).total_seconds())  # 2/3 of 90 days: due
    dying = StoppingStore(data, "node1", stop)
    one.manager.ports = replace(one.manager.ports, store=dying)
    if stop is Died:
        with pytest.raises(Died):
            one.manager.renew_one(CERT)
    else:
        assert one.manager.renew_one(CERT).result == "failed"
    assert data.versions("www") == [1, 2] and data.desired("www") == 1
    journal = data.load_rotation("node1", "www")  # its last rotation's, to version 1: none points to 2
    assert journal is not None and journal["to_version"] == 1 and data.load_order("www") is not None
    assert ca.orders == 2
    return one


@pytest.mark.parametrize("stop", [Died, StoreUnreachable])
@pytest.mark.parametrize("who", ["node1 renews", "node2 finishes"])
def test_a_version_stored_before_its_rotation_journal_is_rolled_out_not_ordered_again(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock], stop: type[BaseException], who: str) -> None:
    """Version 2 stored, then the node died or the database stopped before its rotation journal: the next attempt (the node's scheduled renewal, or another node finishing the journaled order) rolls version 2 out and orders nothing."""
    data, ca, clock = fleet
    stored_then_stopped(tmp_path, data, ca, clock, stop)
    nxt = node(tmp_path, data, ca, clock, "node1" if who == "node1 renews" else "node2")
    out = nxt.manager.renew_one(CERT) if who == "node1 renews" else \
        nxt.manager.resume_order(CERT, initiator="node=node2")
    assert out.result == "renewed" and out.version == 2, out.message
    assert ca.orders == 2, "one certificate per renewal"
    assert (data.versions("www"), data.desired("www")) == ([1, 2], 2)
    assert nxt.edges.switched == [2] and data.load_order("www") is None
    (adopted,) = [e for e in nxt.events if e.kind == "version_adopted"]
    assert adopted.version == 2 and adopted.detail["left_at"] == "stored" and adopted.detail["from_version"] == 1
    assert [e.version for e in nxt.events if e.kind == "renewed"] == [2]
    assert nxt.manager.renew_one(CERT).result == "not_due" and ca.orders == 2


def test_a_version_rolled_back_from_is_not_rolled_out_again(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """Version 2 failed its verify and was rolled back; its order journal came back (a power loss lost the clearing): version 2, newer than the desired version, is not taken for an orphan; the next renewal orders afresh."""
    data, ca, clock = fleet
    one = node(tmp_path, data, ca, clock, "node1")
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    keeping = StoppingStore(data, "node1", None)
    one.manager.ports = replace(one.manager.ports, store=keeping)
    one.edges.fail_verify.add(2)
    assert one.manager.renew_one(CERT, force=True).result == "rolled_back"
    assert (data.versions("www"), data.desired("www"), data.load_order("www")) == ([1, 2], 1, None)
    with data.lock("www"):
        data.save_order("www", keeping.journals[-1])  # back from the dead
    out = one.manager.renew_one(CERT, force=True)
    assert out.result == "renewed" and out.version == 3, out.message
    assert ca.orders == 3 and not [e for e in one.events if e.kind == "version_adopted"]


@pytest.mark.parametrize("mark", [{"revoked": {"reason": "superseded"}}, {"key_compromised": True},
                                  {"release_bad": {"state": "aborted", "reason": "canary node2 failed"}}])
def test_an_orphan_revoked_compromised_or_bad_is_not_rolled_out(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock], mark: dict[str, Any]) -> None:
    """An orphan version marked revoked, compromised or bad since (S3) is never rolled out; the renewal orders afresh."""
    data, ca, clock = fleet
    stored_then_stopped(tmp_path, data, ca, clock, Died)
    with data.lock("www"):
        data.update_meta("www", 2, mark)
    two = node(tmp_path, data, ca, clock, "node2")
    out = two.manager.renew_one(CERT)
    assert out.result == "renewed" and out.version == 3, out.message
    assert ca.orders == 3 and two.edges.switched == [3]


def test_a_key_compromise_renewal_does_not_roll_out_an_orphan(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """Revoking for keyCompromise renews with a key made now: an orphan's key, made before, is not taken instead."""
    data, ca, clock = fleet
    one = stored_then_stopped(tmp_path, data, ca, clock, Died)
    one.manager.ports = replace(one.manager.ports, store=data.handle("node1"))
    out = one.manager.revoke(CERT, "keyCompromise")
    assert out.version == 3 and ca.revoked == 1, out.message
    assert ca.orders == 3 and not [e for e in one.events if e.kind == "version_adopted"]


#: the configuration changed since version 2 was ordered at https://p.test/dir with no profile
PRODUCTION = AcmeConfig("https://production.test/dir")  # the same [acme] table ("default"), another CA
CHANGED = [pytest.param(PRODUCTION, CERT, id="another CA directory"),
           pytest.param(FIRST, replace(CERT, profile="shortlived"), id="a profile required")]


@pytest.mark.parametrize("acme, cert", CHANGED)
def test_an_orphan_ordered_for_another_ca_or_profile_is_not_rolled_out(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock], acme: AcmeConfig, cert: CertificateConfig) -> None:
    """Version 2 stored from the staging CA, then the node died; the operator switched the certificate to production (or to a required profile): the next renewal orders afresh there instead of rolling out a certificate of the CA (profile) no longer configured, and drops the stale order journal."""
    data, ca, clock = fleet
    stored_then_stopped(tmp_path, data, ca, clock, Died)
    two = node(tmp_path, data, ca, clock, "node2", acme, cert)
    out = two.manager.renew_one(cert)
    assert out.result == "renewed" and out.version == 3, out.message
    assert ca.orders == 3 and two.edges.switched == [3] and data.load_order("www") is None
    assert not [e for e in two.events if e.kind == "version_adopted"]


def test_a_dead_nodes_version_from_a_ca_no_longer_configured_is_not_adopted(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock]) -> None:
    """node1 stored version 2 from the CA at https://p.test/dir and died switching to it; the [acme] table now names another CA: node2 drops node1's rotation and orders from the configured CA."""
    data, ca, clock = fleet
    died_after_storing(tmp_path, data, ca, clock)
    two = node(tmp_path, data, ca, clock, "node2", PRODUCTION)
    out = two.manager.renew_one(CERT)
    assert out.result == "renewed" and out.version == 3, out.message
    assert ca.orders == 3 and data.load_rotation("node1", "www") is None
    assert not [e for e in two.events if e.kind == "version_adopted"]


class UnclearedStore(MemoryStore):
    """A node's store that cannot clear the order journal (``clearing``: a full disk, a database stopping)."""

    def __init__(self, data: MemoryStore, node: str) -> None:
        super().__init__(clock=data._clock, node=node, _data=data._d)
        self.clearing = True

    def save_order(self, name: str, order: Any, *, lease: Any = None) -> None:
        if order is None and not self.clearing:
            raise StoreError("cannot write the order journal: no space left on device")
        super().save_order(name, order, lease=lease)


@pytest.mark.parametrize("tick", ["while version 3 is desired", "after the first rollback"])
def test_a_stale_order_journal_does_not_bring_back_a_version_rolled_back_from(
        tmp_path: Path, fleet: tuple[MemoryStore, CA, FakeClock], tick: str) -> None:
    """Version 3 rolled out but its order journal could not be cleared; a scheduled renewal (not due) sees that journal and clears it, so after two rollbacks (3 -> 2 -> 1) version 3, named by no rotation any more, is not taken for an orphan and rolled out again."""
    data, ca, clock = fleet
    one = node(tmp_path, data, ca, clock, "node1")
    store = UnclearedStore(data, "node1")
    one.manager.ports = replace(one.manager.ports, store=store)
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    store.clearing = False
    assert one.manager.renew_one(CERT, force=True).result == "renewed"
    store.clearing = True
    assert data.desired("www") == 3 and data.load_order("www") is not None  # stale: its clear failed
    if tick == "while version 3 is desired":
        assert one.manager.renew_one(CERT).result == "not_due"
    assert one.manager.rollback(CERT, reason="bad").version == 2
    if tick == "after the first rollback":
        assert one.manager.renew_one(CERT).result == "not_due"
    assert data.load_order("www") is None
    assert one.manager.rollback(CERT, to_version=1, reason="worse").version == 1
    out = one.manager.renew_one(CERT)
    assert out.result == "not_due" and data.desired("www") == 1, out.message
    assert ca.orders == 3 and not [e for e in one.events if e.kind == "version_adopted"]


def _version(version: int = 2, meta: dict[str, Any] | None = None, **info: Any) -> VersionInfo:
    """Version ``version`` of www, valid 90 days from START (``info``: CertInfo fields to change)."""
    base = make_bundle(CERT.identifiers, not_before=START).info
    return VersionInfo("www", version, replace(base, **info), {"created": "2026-11-01T00:00:05Z", **(meta or {})})


@pytest.mark.parametrize("current, version, pointed, want", [
    (1, _version(), (), None),                                          # the orphan: rolled out
    (None, _version(1), (), None),                                      # a first issuance's orphan too
    (2, _version(), (), "not newer than version 2"),                    # desired already: nothing to do
    (3, _version(), (), "not newer than version 3"),                    # rolled back past it
    (1, _version(), (1, 2), "took version 2 already"),                  # a rotation (or rollback) names it
    (1, _version(meta={"revoked": {"reason": "superseded"}}), (), "was revoked"),
    (1, _version(meta={"key_compromised": True}), (), "compromised key"),
    (1, _version(meta={"key_destroyed": True}), (), "was destroyed"),
    (1, _version(meta={"release_bad": {"state": "aborted", "reason": "canary failed"}}), (), "marked bad"),
    (1, _version(not_after=START + timedelta(days=1)), (), "expired at"),
    (1, _version(domains=("other.example.test",)), (), "no longer matches the configuration"),
    (1, _version(key_type="rsa-2048"), (), "no longer matches the configuration"),
    (1, _version(meta={"ca": "default", "ca_directory": "https://p.test/dir/"}), (), None),  # the same CA
    (1, _version(meta={"ca": "default", "ca_directory": "https://staging.test/dir"}), (), "no longer configured"),
    (1, _version(meta={"ca": "staging"}), (), "no longer configured"),  # a name alone: the table's
    (1, _version(meta={"profile": "classic"}), (), None),            # no profile required: any
])
def test_orphan_refusal(current: int | None, version: VersionInfo, pointed: tuple[int, ...], want: str | None) -> None:
    """A stored version the journaled order yielded is rolled out instead of ordering only when newer than the desired one, named by no rotation or release, deployable (S3), unexpired and still the configuration's (names, key type, CA)."""
    got = orphan_refusal(CERT, (FIRST,), JOURNAL, current, version, pointed, START + timedelta(days=2))
    assert (got is None) if want is None else (got is not None and want in got), got


JOURNAL = OrderJournal("https://p.test/order/2", b"", "2026-11-01T00:00:01Z",
                       resume.journal_meta(FIRST.directory, CERT.identifiers, None, CERT.key_type))
SHORT = replace(CERT, profile="shortlived")


@pytest.mark.parametrize("cert, journal, version, want", [
    (CERT, JOURNAL, _version(), None),
    (CERT, replace(JOURNAL, meta={**JOURNAL.meta, "directory": "https://staging.test/dir"}), _version(),
     "placed with another CA (https://staging.test/dir)"),
    (CERT, replace(JOURNAL, meta={**JOURNAL.meta, "domains": ["other.example.test"]}), _version(), "other names"),
    (CERT, replace(JOURNAL, meta={**JOURNAL.meta, "key_type": "rsa-2048"}), _version(), "its key is rsa-2048"),
    (SHORT, JOURNAL, _version(meta={"profile": "shortlived"}), "ordered with profile None"),
    (SHORT, replace(JOURNAL, meta={**JOURNAL.meta, "profile": "shortlived"}), _version(), "has profile None"),
    (SHORT, replace(JOURNAL, meta={**JOURNAL.meta, "profile": "shortlived"}), _version(meta={"profile": "shortlived"}),
     None),
])
def test_an_orphan_must_be_ordered_as_the_configuration_orders_now(
        cert: CertificateConfig, journal: OrderJournal, version: VersionInfo, want: str | None) -> None:
    """An orphan is rolled out only if its order is one the certificate would place now (as the order step judges a journal it resumes): the CA's directory, the names, the key type and a required profile, on the journal and on the version."""
    got = orphan_refusal(cert, (FIRST,), journal, 1, version, (), START + timedelta(days=2))
    assert (got is None) if want is None else (got is not None and want in got), got


def test_stored_from_matches_the_journaled_key_stored_after_the_journal() -> None:
    """The journaled order's certificate is the version with its key stored after the journal was written (with reuse_key, older versions share the key)."""
    bundle = make_bundle(CERT.identifiers, not_before=START)
    stored = VersionInfo("www", 2, bundle.info, {"created": "2026-11-01T00:00:05Z"})
    journal = OrderJournal("https://p.test/order/2", bundle.key_pem, "2026-11-01T00:00:01Z")
    assert stored_from(journal, stored)
    assert not stored_from(replace(journal, created="2026-11-01T00:00:09Z"), stored)  # an older version, same key
    assert not stored_from(replace(journal, key_pem=make_bundle(CERT.identifiers).key_pem), stored)
    assert not stored_from(replace(journal, key_pem=b"not a key"), stored)
    assert not stored_from(journal, replace(stored, meta={}))
