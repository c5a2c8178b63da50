"""The engine's use cases (renew, roll back, revoke, recover, redeploy, status) over fake ports:
an issuer that signs locally, edges that record what they are asked and fail on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Collection

import pytest
from cryptography.hazmat.primitives import serialization

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock, isoformat
from certd.core.errors import CANotReachable, OperationFailed, UsageError, VerificationFailed
from certd.core.events import EventBus, LifecycleEvent
from certd.core.rotation import Journal, Step
from certd.engine.lifecycle import Revocation, VersionStatus, compromised_meta
from certd.engine.outcome import Outcome, RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.recover import recover_all
from certd.engine.redeploy import redeploy
from certd.engine.renew import Renew, renew_all
from certd.engine.revoke import Revoke, fleet_wait
from certd.engine.rollback import Rollback
from certd.engine.status import Status
from certd.store.files import FileStore
from certd.store.port import Compromise
from tests.support.certs import CA, make_ca, make_leaf

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
CERT = CertificateConfig("www", ("www.example.test",))


class FakeCA:
    """The IssuerPort: signs the key it is given with a local CA; fails while ``failure`` is set."""

    def __init__(self, ca: CA, clock: FakeClock) -> None:
        self.ca, self.clock = ca, clock
        self.failure: Exception | None = None
        self.orders: list[str | None] = []     # the replaces id of each order
        self.revoked: list[int] = []           # reason codes

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None,
              progress: Any = None, on_order: Any = None, before: Any = None) -> bytes:
        self.orders.append(replaces)
        if self.failure is not None:
            raise self.failure
        key = serialization.load_pem_private_key(key_pem, None)
        leaf = make_leaf(self.ca, cert.domains, key=key, not_before=self.clock.now() - timedelta(hours=1))  # type: ignore[arg-type]
        return leaf.fullchain_pem

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def revoke(self, cert_pem: bytes, reason: int) -> None:
        if self.failure is not None:
            raise self.failure
        self.revoked.append(reason)

    def close(self) -> None:
        pass


@dataclass
class FakeEffects:
    """rotation.Effects that record each call and raise for the versions told to fail."""

    edges: FakeEdges

    def _step(self, what: str, version: int) -> None:
        self.edges.calls.append((what, version))
        if (what, version) in self.edges.fail:
            raise VerificationFailed(f"{what} of version {version} failed") if what == "verify" \
                else OperationFailed(f"{what} of version {version} failed")

    def stage(self, version: int) -> None:
        self._step("stage", version)

    def switch(self, version: int) -> None:
        self._step("switch", version)

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        self._step("reload", version)
        return []

    def verify(self, version: int) -> bool:
        self._step("verify", version)
        return True

    def commit(self, version: int) -> None:
        self.edges.store.set_current(self.edges.cert_name, version)


@dataclass
class FakeEdges:
    """The Edges port: records calls; ``fail`` holds (step, version) pairs that raise."""

    store: FileStore
    cert_name: str = "www"
    calls: list[tuple[str, int]] = field(default_factory=list)
    fail: set[tuple[str, int]] = field(default_factory=set)
    destroyed: list[bytes] = field(default_factory=list)

    def check_safe(self, cert: CertificateConfig) -> None:
        pass

    def effects(self, cert: CertificateConfig, *, repair: bool = False) -> FakeEffects:
        return FakeEffects(self)

    def prune(self, cert: CertificateConfig, keep: Collection[int]) -> None:
        pass

    def destroy_keys(self, cert: CertificateConfig, keys: Collection[bytes], *,
                     spkis: Collection[str] = ()) -> list[Path]:
        self.destroyed.extend(keys)
        return []

    def served(self, cert: CertificateConfig, fingerprint_sha256: str, timeout: float) -> list[str]:
        if ("served", 0) in self.fail:
            raise VerificationFailed("127.0.0.1:443 serves another certificate")
        return ["127.0.0.1:443"]


@dataclass
class World:
    ports: Ports
    planner: Planner
    ca: FakeCA
    edges: FakeEdges
    clock: FakeClock
    events: list[LifecycleEvent]

    def renew(self, **kw: Any) -> Outcome:
        return Renew(self.ports, self.planner)(RenewRequest(CERT, **kw))

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


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
    return World(ports, Planner(store, clock, lambda: issuer), issuer, edges, clock, seen)


# -- renew: one outcome per path ------------------------------------------------------------

def test_renew_issues_the_first_certificate_and_commits_it(world: World) -> None:
    """No certificate yet: due at once; issued, staged, switched, reloaded, verified, committed."""
    o = world.renew()
    assert (o.result, o.version, o.ok) == (Result.RENEWED, 1, True)
    assert world.ports.store.current("www") == 1
    assert [c[0] for c in world.edges.calls] == ["stage", "switch", "reload", "verify"]
    assert world.kinds()[0] == "issued" and world.kinds()[-1] == "renewed"
    assert world.planner.load_state("www").last_result == "success"


def test_renew_not_due_orders_nothing(world: World) -> None:
    """A fresh certificate is not due: no order, outcome not_due naming when it renews."""
    world.renew()
    orders = len(world.ca.orders)
    o = world.renew()
    assert o.result == Result.NOT_DUE and o.message.startswith("renews at ") and o.version == 1
    assert len(world.ca.orders) == orders


def test_forced_renewal_replaces_the_current_version_by_its_ari_id(world: World) -> None:
    """A forced renewal of a fresh certificate orders at once, naming the one it replaces."""
    world.renew()
    o = world.renew(force=True, reason="test", initiator="uid=0(root)")
    assert (o.result, o.version) == (Result.RENEWED, 2)
    assert world.ca.orders[-1] is not None
    forced = [e for e in world.events if e.kind == "forced"]
    assert forced and forced[0].initiator == "uid=0(root)"


def test_an_order_that_fails_is_failed_and_counted(world: World) -> None:
    """The CA unreachable: failed, one failure recorded, and the CLI's message says run again."""
    world.ca.failure = CANotReachable("issuing www: the CA did not answer")
    o = world.renew()
    assert o.result == Result.FAILED and not o.ok
    assert o.message.endswith("run certd renew www again later (certd run retries by itself)")
    state = world.planner.load_state("www")
    assert (state.failures, state.ca_unreachable, state.last_result) == (1, True, "failed")
    assert "renewal_failed" in world.kinds()


def test_a_forced_renewal_past_the_duplicate_limit_is_refused_unless_ignored(world: World) -> None:
    """Five certificates for the same names this week: refused (no order); ignoring the limit renews."""
    world.renew()
    state = world.planner.load_state("www")
    state.issued = [{"at": isoformat(NOW), "names": ["www.example.test"]}] * 5
    world.planner.save_state("www", state)
    orders = len(world.ca.orders)
    o = world.renew(force=True)
    assert o.result == Result.REFUSED and "duplicate-certificate limit" in o.message
    assert len(world.ca.orders) == orders
    assert world.renew(force=True, ignore_duplicate_limit=True).result == Result.RENEWED


def test_a_failing_stage_fails_before_anything_is_switched(world: World) -> None:
    """Staging version 2 fails: outcome failed, version 1 stays current, nothing switched."""
    world.renew()
    world.edges.fail.add(("stage", 2))
    o = world.renew(force=True)
    assert (o.result, o.version) == (Result.FAILED, 1)
    assert world.ports.store.current("www") == 1 and ("switch", 2) not in world.edges.calls


def test_a_new_version_that_fails_verification_is_rolled_back(world: World) -> None:
    """Version 2 is not served: the rotation returns to version 1 (verified); outcome rolled_back."""
    world.renew()
    world.edges.fail.add(("verify", 2))
    o = world.renew(force=True)
    assert (o.result, o.version) == (Result.ROLLED_BACK, 1)
    assert o.message.startswith("rolled back to version 1")
    assert world.ports.store.current("www") == 1 and "rolled_back" in world.kinds()


def test_a_rollback_that_cannot_be_proven_is_rollback_failed(world: World) -> None:
    """Neither version verifies: outcome rollback_failed, with the one-line page text."""
    world.renew()
    world.edges.fail |= {("verify", 2), ("verify", 1)}
    o = world.renew(force=True)
    assert o.result == Result.ROLLBACK_FAILED and o.message.startswith("ROLLBACK FAILED, check the endpoints now")
    assert "rollback_failed" in world.kinds()


def test_a_first_certificate_that_fails_verification_is_deployed_unverified(world: World) -> None:
    """Nothing to go back to: the first version stays deployed; outcome deployed_unverified."""
    world.edges.fail.add(("verify", 1))
    o = world.renew()
    assert (o.result, o.version) == (Result.DEPLOYED_UNVERIFIED, 1)


def test_a_rotation_a_crash_left_unfinished_is_finished_first_and_reported(world: World) -> None:
    """A journal stopped at switched is driven to its end before the renewal, and the outcome says so."""
    world.renew()
    v2 = world.ports.store.add_version("www", world.ports.store.load("www", 1).bundle, {})
    j = Journal("j1", "www", "renew", 1, v2, Step.SWITCHED, isoformat(NOW) or "")
    world.ports.store.save_journal("www", j.to_json())
    o = world.renew()
    assert o.result == Result.NOT_DUE
    assert o.message.startswith(f"resumed a renew to version {v2} that a crash interrupted: committed version {v2}")
    assert world.ports.store.current("www") == v2


def test_renew_all_keeps_order_and_survives_a_crashing_renewal(world: World) -> None:
    """A bug in one renewal becomes its failed outcome; the others' outcomes come back in order."""
    class Boom(Renew):
        def __call__(self, req: RenewRequest, progress: Any = None) -> Outcome:
            if req.reason == "boom":
                raise RuntimeError("bug")
            return super().__call__(req, progress)
    outcomes = renew_all(Boom(world.ports, world.planner),
                         [RenewRequest(CERT, reason="boom"), RenewRequest(CERT)], workers=2)
    assert [o.result for o in outcomes] == [Result.FAILED, Result.RENEWED]
    assert outcomes[0].message == "internal error: RuntimeError: bug"


# -- roll back, redeploy, status -------------------------------------------------------------

def test_rollback_switches_to_the_previous_version_and_refuses_a_revoked_one(world: World) -> None:
    """Rollback from 2 goes to 1 (switched); a revoked target is refused with UsageError."""
    world.renew()
    world.renew(force=True)
    o = Rollback(world.ports, world.planner)(CERT, reason="test")
    assert (o.result, o.version) == (Result.SWITCHED, 1)
    world.ports.store.update_meta("www", 2, Revocation.of("superseded", isoformat(NOW), "test").to_meta())
    with pytest.raises(UsageError, match="version 2 was revoked \\(superseded\\)"):
        Rollback(world.ports, world.planner)(CERT, to_version=2)


def test_redeploy_and_verify_report_on_the_current_version(world: World) -> None:
    """Redeploy stages the current version again (verified); status's verify says who serves it."""
    assert redeploy(world.ports, world.planner, CERT).result == Result.NOT_DUE
    world.renew()
    assert redeploy(world.ports, world.planner, CERT).result == Result.VERIFIED
    status = Status(world.ports, world.planner)
    assert status.verify(CERT).result == Result.NOT_DUE  # no verify endpoints configured
    assert status.row(CERT)["version"] == 1


# -- revoke -------------------------------------------------------------------------------------

def test_cessation_revokes_only_and_holds_the_scheduler(world: World) -> None:
    """cessationOfOperation: revoked (code 5), no renewal, and the version is held from then on."""
    world.renew()
    o = Revoke(world.ports, world.planner)(CERT, "cessationOfOperation", initiator="uid=0(root)")
    assert (o.result, o.version) == (Result.REVOKED, 1) and world.ca.revoked == [5]
    status = VersionStatus.from_meta(world.ports.store.load("www", 1).meta)
    assert status.revoked is not None and status.held and "uid=0(root)" in status.held


def test_key_compromise_rekeys_rotates_and_destroys_the_old_key(world: World) -> None:
    """keyCompromise: revoked (code 1), renewed with a fresh key, old key destroyed everywhere."""
    world.renew()
    old_key = world.ports.store.load("www", 1).bundle.key_pem
    o = Revoke(world.ports, world.planner)(CERT, "keyCompromise")
    assert (o.result, o.version) == (Result.REVOKED, 2) and world.ca.revoked == [1]
    assert world.ports.store.load("www", 2).bundle.key_pem != old_key
    old = VersionStatus.from_meta(world.ports.store.load("www", 1).meta)
    assert old.key_compromised and old.key_destroyed and old.revoked and old.revoked.reason == "keyCompromise"
    assert world.edges.destroyed == [old_key] and "key_destroyed" in world.kinds()


class FakeFleetBook:
    """A fleet's record of compromised keys (certd.store.pgcompromise) where ``node3`` moves off
    the key after ``node3_after`` looks (None: never)."""

    node = "node1"

    def __init__(self, node3_after: int | None) -> None:
        self.node3_after, self.looks = node3_after, 0
        self.recorded: list[tuple[str, str, int]] = []

    def destroyed(self, name: str, spki: str, files: int) -> None:
        self.recorded.append((name, spki, files))

    def complete(self, name: str, spki: str, within: float, event: Any) -> tuple[Compromise, bool]:
        self.looks += 1
        if self.node3_after is None or self.looks <= self.node3_after:
            return Compromise(name, spki, ("node3",), False, None, ("node1",)), False
        return Compromise(name, spki, (), False, NOW, ("node1", "node3")), True


@pytest.mark.parametrize("node3_after", [2, None])
def test_key_compromise_in_a_fleet_is_complete_only_once_every_live_node_destroyed_the_key(
        world: World, node3_after: int | None) -> None:
    """In a fleet revoke waits (bounded) for the other nodes; it fails naming the node that still holds the key."""
    world.renew()
    spki = world.ports.store.load("www", 1).bundle.info.spki_sha256
    book = FakeFleetBook(node3_after)
    world.ports.store.compromises = book  # type: ignore[attr-defined]
    started = world.clock.monotonic()
    o = Revoke(world.ports, world.planner)(CERT, "keyCompromise")
    assert book.recorded == [("www", spki, 0)]  # this node's own destruction, recorded
    if node3_after is not None:
        assert o.result == Result.REVOKED and "revocation complete: every live node (node1, node3)" in o.message
        assert book.looks == 3
    else:
        assert o.result == Result.FAILED and "NOT complete after 80 s: node(s) node3 still hold" in o.message
        assert "certd nodes remove NODE" in o.message
        assert world.clock.monotonic() - started >= fleet_wait(30.0, CERT.verify_timeout)


def test_superseded_whose_renewal_fails_revokes_nothing(world: World) -> None:
    """superseded: the renewal comes first; when it fails, the serving certificate is not revoked."""
    world.renew()
    world.ca.failure = OperationFailed("the CA said no")
    o = Revoke(world.ports, world.planner)(CERT, "superseded")
    assert o.result == Result.FAILED and "NOT revoked" in o.message and world.ca.revoked == []


# -- recover ------------------------------------------------------------------------------------

def test_recover_all_finishes_unfinished_rotations(world: World) -> None:
    """At start, a journal stopped at staged is driven to commit; finished journals are left alone."""
    world.renew()
    v2 = world.ports.store.add_version("www", world.ports.store.load("www", 1).bundle, {})
    world.ports.store.save_journal("www", Journal("j2", "www", "renew", 1, v2, Step.STAGED,
                                                  isoformat(NOW) or "").to_json())
    (j,) = recover_all(world.ports, world.planner)
    assert j.step == Step.COMMITTED and world.ports.store.current("www") == v2
    assert recover_all(world.ports, world.planner) == []


# -- the typed values keep what users and the disk see -----------------------------------------

def test_result_values_are_the_strings_users_see() -> None:
    """Each Result is its old string (CLI, JSON, audit); ok as before; a plain string is checked."""
    assert [r.value for r in Result] == ["renewed", "not_due", "switched", "verified", "revoked", "refused",
                                         "failed", "rolled_back", "rollback_failed", "deployed_unverified",
                                         "checked"]
    assert {r for r in Result if r.ok} == {Result.RENEWED, Result.NOT_DUE, Result.SWITCHED, Result.VERIFIED,
                                           Result.REVOKED, Result.CHECKED}
    assert Outcome("www", "failed", "x").result is Result.FAILED  # type: ignore[arg-type]
    assert Outcome("www", Result.RENEWED, "m", 2, "ab").to_json() == {
        "name": "www", "result": "renewed", "message": "m", "version": 2, "serial": "ab", "ok": True}
    with pytest.raises(ValueError):
        Outcome("www", "renewd", "typo")  # type: ignore[arg-type]


def test_version_status_reads_and_writes_the_same_meta_keys() -> None:
    """The typed status round-trips through the meta keys on disk, unchanged."""
    mark = Revocation.of("cessationOfOperation", "2026-11-22T12:00:00Z", "uid=0(root)")
    meta = {**mark.to_meta(), **compromised_meta(), "key_destroyed": True}
    assert meta == {"revoked": {"reason": "cessationOfOperation", "code": 5, "time": "2026-11-22T12:00:00Z",
                                "initiator": "uid=0(root)"}, "key_compromised": True, "key_destroyed": True}
    status = VersionStatus.from_meta(meta)
    assert status.revoked == mark and status.key_compromised and status.key_destroyed and status.held
    assert VersionStatus.from_meta({}) == VersionStatus() and VersionStatus().held is None
    assert VersionStatus.from_meta({"revoked": {"reason": "superseded"}}).held is None
