"""The order journal: the resume decision table (certd.acme.resume) and the renewal's issue step
around it (certd.engine.orders) over a FileStore and a fake CA that keeps its orders."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from certd.acme import lookup, resume
from certd.acme.resume import Step, journal_meta, journal_mismatch, next_step, order_may_live
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock
from certd.core.errors import (AcmeError, CANotReachable, CertificateRejected, ChallengeFailed, OperationFailed,
                               StoreError, StoreUnreachable)
from certd.core.events import EventBus, LifecycleEvent
from certd.core.retry import NEW_ORDER
from certd.crypto import keys
from certd.engine.lifecycle import compromised_meta
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.renew import Renew
from certd.store.files import FileStore
from certd.store.port import OrderJournal
from tests.support.certs import CA, make_ca, make_leaf
from tests.unit.test_usecases import FakeEdges

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
DIRECTORY = "https://127.0.0.1:14000/dir"
CERT = CertificateConfig("www", ("www.example.test", "example.test"))


# -- the decision table ----------------------------------------------------------------------

def test_a_journal_for_the_same_ca_and_names_may_be_resumed_whatever_their_order() -> None:
    """Same directory, same names in another order, same (or unrecorded) key type: resumable."""
    meta = journal_meta(DIRECTORY, ["example.test", "www.example.test"], None, "ecdsa-p256")
    assert journal_mismatch(meta, DIRECTORY, CERT.domains, "ecdsa-p256") is None
    assert journal_mismatch(journal_meta(DIRECTORY, CERT.domains, None), DIRECTORY, CERT.domains, "rsa-2048") is None


@pytest.mark.parametrize("meta,words", [
    (journal_meta("https://other.test/dir", CERT.domains, None), "another CA (https://other.test/dir)"),
    (journal_meta(DIRECTORY, ["www.example.test"], None), "other names (www.example.test)"),
    (journal_meta(DIRECTORY, [*CERT.domains, "extra.test"], None), "other names"),
    ({}, "another CA (unknown)"),
    ({resume.META_DIRECTORY: DIRECTORY}, "other names (unknown)"),
    (journal_meta(DIRECTORY, CERT.domains, None, "rsa-2048"), "its key is rsa-2048"),
])
def test_a_journal_for_another_ca_names_or_key_type_is_not_resumed(meta: dict[str, Any], words: str) -> None:
    """Another CA, other names, another key type, or no record of CA/names: not resumable, and the reason says which."""
    why = journal_mismatch(meta, DIRECTORY, CERT.domains, "ecdsa-p256")
    assert why is not None and words in why


@pytest.mark.parametrize("status,step", [
    ("valid", Step.DOWNLOAD), ("processing", Step.WAIT), ("ready", Step.FINALIZE), ("pending", Step.VALIDATE),
    ("invalid", Step.DISCARD), ("deactivated", Step.DISCARD), ("unheard-of", Step.DISCARD),
])
def test_each_order_status_maps_to_one_step(status: str, step: Step) -> None:
    """valid: download; processing: wait; ready: finalize; pending: validate; anything else: discard."""
    got, why = next_step(status, NOW + timedelta(days=1), NOW)
    assert got is step and status in why


@pytest.mark.parametrize("status", ["pending", "ready", "processing"])
def test_an_expired_order_is_discarded_unless_already_valid(status: str) -> None:
    """Past its expiry an unfinished order is discarded (it cannot be finalized); a valid one is still downloaded."""
    got, why = next_step(status, NOW - timedelta(seconds=1), NOW)
    assert got is Step.DISCARD and "expired" in why
    assert next_step("valid", NOW - timedelta(days=1), NOW)[0] is Step.DOWNLOAD


@pytest.mark.parametrize("error,lives", [
    (CANotReachable("the CA did not answer"), True),
    (AcmeError("still waiting for validation; will retry", transient=True), True),
    (StoreError("cannot write versions/0002: No space left on device"), True),
    (AcmeError("the CA said no", transient=False), False),
    (ChallengeFailed("the CA could not validate http-01", transient=True), False),
    (CertificateRejected("the leaf is for another public key"), False),
    (OperationFailed("stage failed"), False),
])
def test_a_failure_keeps_the_journal_only_while_the_order_may_still_complete(error: Exception, lives: bool) -> None:
    """Unreachable/slow CA or a store failure keep the order; a failed validation, a refusal or a rejected certificate end it."""
    assert order_may_live(error) is lives


@pytest.mark.parametrize("problem,status,gone", [
    ("malformed", None, True), ("unauthorized", None, True), ("accountDoesNotExist", None, True),
    ("about:blank", None, True), (None, 404, True), (None, 410, True),
    ("serverInternal", None, False), ("rateLimited", None, False), ("badNonce", None, False),
    (None, 500, False), (None, 502, False), (None, None, False),
])
def test_only_answers_that_deny_the_order_discard_it(problem: str | None, status: int | None, gone: bool) -> None:
    """Unknown order or account (problem, or a bare 404/410): gone; a CA in trouble says nothing about the order."""
    assert resume.order_gone(problem, status) is gone


# -- the renewal's issue step ----------------------------------------------------------------

class OrderingCA:
    """An IssuerPort whose orders persist like a CA's: ``issue`` journals through ``on_order``
    then signs; ``resume`` answers from ``status`` (None: the CA does not know the order)."""

    def __init__(self, ca: CA) -> None:
        self.ca = ca
        self.new_orders: list[str] = []
        self.resumed: list[str] = []
        self.status: dict[str, str] = {}
        self.failure: Exception | None = None
        self.journal_at_order: OrderJournal | None = None
        self.journal_at_intent: OrderJournal | None = None
        self.store: FileStore | None = None
        self.key_mode = 0
        self.lose_reply = False           # newOrder accepted, its reply lost (the process dies there)
        self.refusal: Exception | None = None   # the CA's answer to newOrder: a problem, no order
        self.listed: str | None = None    # what find_order answers for an intent
        self.lookups: list[bytes] = []    # the intent keys looked up
        self.lookup_args: list[dict[str, Any]] = []   # what else each lookup was told
        self.lookup_failure: Exception | None = None  # what find_order raises

    def _sign(self, cert: CertificateConfig, key_pem: bytes) -> bytes:
        key = serialization.load_pem_private_key(key_pem, None)
        return make_leaf(self.ca, cert.domains, key=key, not_before=NOW - timedelta(hours=1)).fullchain_pem  # type: ignore[arg-type]

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None, progress: Any = None,
              on_order: Any = None, before: Any = None) -> bytes:
        assert self.store is not None
        if before is not None:
            before("newOrder")
            self.journal_at_intent = self.store.load_order(cert.name)
        if self.refusal is not None:
            raise self.refusal
        url = f"https://ca.test/order/{len(self.new_orders) + 1}"
        self.new_orders.append(url)
        if self.lose_reply:
            raise CANotReachable("the CA did not answer newOrder")
        if on_order is not None:
            on_order(url)
        assert self.store is not None
        self.journal_at_order = self.store.load_order(cert.name)  # what a crash before finalize leaves
        key_file = self.store.root / "certs" / cert.name / "order.key"
        self.key_mode = stat.S_IMODE(key_file.stat().st_mode) if key_file.exists() else 0
        if self.failure is not None:
            raise self.failure
        return self._sign(cert, key_pem)

    def resume(self, cert: CertificateConfig, order_url: str, key_pem: bytes, *, progress: Any = None,
               before: Any = None) -> bytes | None:
        self.resumed.append(order_url)
        if self.status.get(order_url) in (None, "invalid"):
            return None
        if self.failure is not None:
            raise self.failure
        return self._sign(cert, key_pem)

    def find_order(self, cert: CertificateConfig, key_pem: bytes, *, profile: str | None = None,
                   newer_than: datetime | None = None, twins: resume.Twins | None = None,
                   progress: Any = None) -> tuple[str | None, str]:
        self.lookups.append(key_pem)
        self.lookup_args.append({"newer_than": newer_than, "twins": twins})
        if self.lookup_failure is not None:
            raise self.lookup_failure
        return self.listed, "listed" if self.listed else "nothing listed"

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def test_ca() -> CA:
    return make_ca(now=NOW)


@pytest.fixture
def world(tmp_path: Path, test_ca: CA) -> tuple[Renew, OrderingCA, FileStore]:
    clock = FakeClock(NOW)
    store = FileStore(tmp_path / "state")
    issuer = OrderingCA(test_ca)
    issuer.store = store
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig(DIRECTORY), (CERT,))
    ports = Ports(config, store, store, lambda: issuer, EventBus(), clock, FakeEdges(store))
    return Renew(ports, Planner(store, clock, lambda: issuer)), issuer, store


def events_of(renew: Renew) -> list[LifecycleEvent]:
    seen: list[LifecycleEvent] = []
    renew.ports.events.subscribe(seen.append)
    return seen


def journal(store: FileStore, url: str, key_pem: bytes, meta: dict[str, Any] | None = None) -> None:
    with store.lock("www"):
        store.save_order("www", OrderJournal(url, key_pem, "2026-11-22T11:00:00Z",
                                             meta if meta is not None else journal_meta(DIRECTORY, CERT.domains, None)))


def test_a_new_order_is_journaled_before_finalize_and_cleared_once_stored(world: Any) -> None:
    """The order URL, the new key (0600), the names and the CA are stored when the order exists; gone once the version is."""
    renew, issuer, store = world
    o = renew(RenewRequest(CERT))
    assert o.result is Result.RENEWED and issuer.new_orders == ["https://ca.test/order/1"]
    at_order = issuer.journal_at_order
    assert at_order is not None and at_order.order_url == "https://ca.test/order/1"
    assert at_order.key_pem == store.load("www", 1).bundle.key_pem
    assert journal_mismatch(at_order.meta, DIRECTORY, CERT.domains) is None
    assert "PRIVATE KEY" not in str(at_order.meta)
    assert issuer.key_mode == 0o600
    assert store.load_order("www") is None


@pytest.mark.parametrize("status", ["valid", "ready", "pending", "processing"])
def test_a_journaled_order_the_ca_can_continue_is_resumed_with_its_key(world: Any, status: str) -> None:
    """A journal for this CA and these names: the order is continued (no new order) and the version holds the journaled key."""
    renew, issuer, store = world
    key_pem = keys.generate_private_key(CERT.key_type)
    journal(store, "https://ca.test/order/7", key_pem)
    issuer.status["https://ca.test/order/7"] = status
    o = renew(RenewRequest(CERT))
    assert o.result is Result.RENEWED
    assert issuer.resumed == ["https://ca.test/order/7"] and issuer.new_orders == []
    assert store.load("www", 1).bundle.key_pem == key_pem
    assert store.load_order("www") is None


def test_an_order_the_ca_cannot_continue_is_discarded_for_a_new_one(world: Any) -> None:
    """The CA no longer knows (or invalidated) the journaled order: one new order, with a new key."""
    renew, issuer, store = world
    old_key = keys.generate_private_key(CERT.key_type)
    journal(store, "https://ca.test/order/7", old_key)
    o = renew(RenewRequest(CERT))
    assert o.result is Result.RENEWED
    assert issuer.resumed == ["https://ca.test/order/7"] and issuer.new_orders == ["https://ca.test/order/1"]
    assert store.load("www", 1).bundle.key_pem != old_key and store.load_order("www") is None


@pytest.mark.parametrize("meta", [journal_meta("https://other.test/dir", CERT.domains, None),
                                  journal_meta(DIRECTORY, ["www.example.test"], None)])
def test_a_journal_for_another_ca_or_names_is_not_sent_to_the_ca(world: Any, meta: dict[str, Any]) -> None:
    """Another CA or other names: the journal is discarded without asking the CA, and a new order placed."""
    renew, issuer, store = world
    journal(store, "https://ca.test/order/7", keys.generate_private_key(CERT.key_type), meta)
    issuer.status["https://ca.test/order/7"] = "valid"
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    assert issuer.resumed == [] and issuer.new_orders == ["https://ca.test/order/1"]


def test_an_unreachable_ca_keeps_the_journal_and_a_failed_validation_clears_it(world: Any) -> None:
    """CA unreachable after newOrder: the journal stays for the next attempt, which resumes; a failed validation ends it."""
    renew, issuer, store = world
    issuer.failure = CANotReachable("the CA did not answer")
    assert renew(RenewRequest(CERT)).result is Result.FAILED
    kept = store.load_order("www")
    assert kept is not None and kept.order_url == "https://ca.test/order/1"
    issuer.status[kept.order_url] = "pending"
    issuer.failure = ChallengeFailed("the CA could not validate http-01 for www.example.test", transient=True)
    assert renew(RenewRequest(CERT, force=True)).result is Result.FAILED
    assert issuer.resumed == ["https://ca.test/order/1"] and len(issuer.new_orders) == 1
    assert store.load_order("www") is None


def test_a_journaled_reused_key_marked_compromised_since_is_not_certified_again(world: Any) -> None:
    """reuse_key, killed mid-order, then the key is marked compromised: the journal is discarded and a fresh key ordered."""
    renew, issuer, store = world
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    old_key = store.load("www", 1).bundle.key_pem
    journal(store, "https://ca.test/order/7", old_key)
    issuer.status["https://ca.test/order/7"] = "valid"
    with store.lock("www"):
        store.update_meta("www", 1, compromised_meta())
    assert renew(RenewRequest(CERT, force=True)).result is Result.RENEWED
    assert issuer.resumed == [] and len(issuer.new_orders) == 2
    assert store.load("www", 2).bundle.key_pem != old_key


class FullDiskStore(FileStore):
    """A FileStore whose order journal cannot be written (ENOSPC), the rest as usual."""

    def save_order(self, name: str, order: OrderJournal | None, *, lease: Any = None) -> None:
        if order is not None:
            raise StoreError(f"cannot write {self.root}/certs/{name}/order.key: No space left on device")
        super().save_order(name, order, lease=lease)


def test_a_journal_that_cannot_be_written_does_not_stop_the_order(tmp_path: Path, test_ca: CA) -> None:
    """Writing the order journal is best effort: the store refusing it (full disk) still renews, with one order."""
    clock, store = FakeClock(NOW), FullDiskStore(tmp_path / "state")
    issuer = OrderingCA(test_ca)
    issuer.store = store
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig(DIRECTORY), (CERT,))
    ports = Ports(config, store, store, lambda: issuer, EventBus(), clock, FakeEdges(store))
    o = Renew(ports, Planner(store, clock, lambda: issuer))(RenewRequest(CERT))
    assert o.result is Result.RENEWED and len(issuer.new_orders) == 1 and issuer.journal_at_order is None


# -- the order intent: journaled before newOrder, found again in the account's orders list ---

def test_the_intent_is_journaled_before_new_order_with_the_key_and_no_url(world: Any) -> None:
    """Right before newOrder the journal holds the new key (0600) and the names, with no order URL yet."""
    renew, issuer, store = world
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    intent = issuer.journal_at_intent
    assert intent is not None and intent.intent and intent.order_url == ""
    assert intent.key_pem == store.load("www", 1).bundle.key_pem
    assert journal_mismatch(intent.meta, DIRECTORY, CERT.domains) is None
    assert issuer.key_mode == 0o600 and store.load_order("www") is None and issuer.lookups == []


def test_an_order_whose_reply_was_lost_is_found_in_the_orders_list_and_resumed(world: Any) -> None:
    """newOrder accepted but its answer lost: the next attempt finds that order by the intent and finishes it; one order."""
    renew, issuer, store = world
    seen = events_of(renew)
    issuer.lose_reply = True
    assert renew(RenewRequest(CERT)).result is Result.FAILED
    intent = store.load_order("www")
    assert intent is not None and intent.intent and issuer.new_orders == ["https://ca.test/order/1"]
    issuer.lose_reply, issuer.listed = False, "https://ca.test/order/1"
    issuer.status["https://ca.test/order/1"] = "pending"
    assert renew(RenewRequest(CERT, force=True)).result is Result.RENEWED
    assert issuer.lookups == [intent.key_pem] and issuer.resumed == ["https://ca.test/order/1"]
    assert issuer.new_orders == ["https://ca.test/order/1"], "a second order was placed"
    assert store.load("www", 1).bundle.key_pem == intent.key_pem and store.load_order("www") is None
    (found,) = [e for e in seen if e.kind == "order_intent"]
    assert found.outcome == "found" and found.detail["order"] == "https://ca.test/order/1"


def test_an_intent_the_ca_lists_no_order_for_is_recorded_once_and_ordered_afresh(world: Any) -> None:
    """Nothing in the orders list (or no list at all): one new order, and one audit record saying why."""
    renew, issuer, store = world
    seen = events_of(renew)
    journal(store, "", keys.generate_private_key(CERT.key_type))
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    assert len(issuer.lookups) == 1 and issuer.resumed == [] and issuer.new_orders == ["https://ca.test/order/1"]
    (missed,) = [e for e in seen if e.kind == "order_intent"]
    assert missed.outcome == "not_found" and "no order found for the journaled intent" in missed.reason


def test_an_intent_for_other_names_is_discarded_without_asking_the_ca(world: Any) -> None:
    """The names changed since the intent: no lookup at the CA, one new order for the new names."""
    renew, issuer, store = world
    journal(store, "", keys.generate_private_key(CERT.key_type), journal_meta(DIRECTORY, ["www.example.test"], None))
    issuer.listed = "https://ca.test/order/9"
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    assert issuer.lookups == [] and issuer.resumed == [] and len(issuer.new_orders) == 1


def test_an_intent_whose_lookup_answer_cannot_be_read_is_dropped_and_ordered_afresh(world: Any) -> None:
    """The orders list is garbage (an HTML page, orders not a list): the intent is given up at once — one new order, one audit record — instead of failing every renewal."""
    renew, issuer, store = world
    seen = events_of(renew)
    journal(store, "", keys.generate_private_key(CERT.key_type))
    issuer.lookup_failure = AcmeError("issuing www: the CA sent an answer certd cannot read (Expecting value); "
                                      "will retry", transient=True)
    o = renew(RenewRequest(CERT))
    assert o.result is Result.RENEWED, o.message
    assert len(issuer.lookups) == 1 and issuer.new_orders == ["https://ca.test/order/1"]
    assert store.load_order("www") is None
    (missed,) = [e for e in seen if e.kind == "order_intent"]
    assert missed.outcome == "not_found" and "cannot read" in missed.reason


def test_an_intent_whose_ca_stays_unreachable_is_dropped_after_three_lookups(world: Any) -> None:
    """The CA unreachable for the lookup keeps the intent (the order may be there), but three lookups at most: then one new order."""
    renew, issuer, store = world
    seen = events_of(renew)
    journal(store, "", keys.generate_private_key(CERT.key_type))
    issuer.lookup_failure = CANotReachable("ACME server https://ca.test/dir is not reachable (refused); will retry")
    for tries in (1, 2):
        assert renew(RenewRequest(CERT, force=True)).result is Result.FAILED
        kept = store.load_order("www")
        assert kept is not None and kept.intent and kept.meta["lookups"] == tries and issuer.new_orders == []
    o = renew(RenewRequest(CERT, force=True))
    assert o.result is Result.RENEWED, o.message
    assert len(issuer.lookups) == 3 and issuer.new_orders == ["https://ca.test/order/1"]
    (missed,) = [e for e in seen if e.kind == "order_intent"]
    assert missed.outcome == "not_found" and "unreachable for 3 lookups" in missed.reason


TWIN = CertificateConfig("www-rsa", CERT.domains, key_type="rsa-2048", profile="shortlived")


def test_the_lookup_skips_the_twins_orders_and_older_certificates(tmp_path: Path, test_ca: CA) -> None:
    """An RSA twin for the same names: its journaled order and its profile are never this intent's, its intent makes pending orders doubtful; a valid order must be newer than the newest stored version."""
    clock, store = FakeClock(NOW), FileStore(tmp_path / "state")
    issuer = OrderingCA(test_ca)
    issuer.store = store
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig(DIRECTORY),
                    (CERT, TWIN, CertificateConfig("other", ("www.example.test",), profile="classic")))
    ports = Ports(config, store, store, lambda: issuer, EventBus(), clock, FakeEdges(store))
    renew = Renew(ports, Planner(store, clock, lambda: issuer))
    assert renew(RenewRequest(CERT)).result is Result.RENEWED
    stored = store.load_info("www", 1).info
    for twin_journal, twins in (("https://ca.test/order/77", resume.Twins(frozenset({"https://ca.test/order/77"}))),
                                ("", resume.Twins(intent=True))):
        with store.lock("www-rsa"):
            store.save_order("www-rsa", OrderJournal(twin_journal, keys.generate_private_key("rsa-2048"),
                                                     "2026-11-22T11:00:00Z", journal_meta(DIRECTORY, CERT.domains, None)))
        with store.lock("other"):
            store.save_order("other", OrderJournal("https://ca.test/order/88", keys.generate_private_key(CERT.key_type),
                                                   "2026-11-22T11:00:00Z", journal_meta(DIRECTORY, ["www.example.test"], None)))
        journal(store, "", keys.generate_private_key(CERT.key_type))
        assert renew(RenewRequest(CERT, force=True)).result is Result.RENEWED
        expected = resume.Twins(twins.orders, twins.intent, frozenset({"shortlived"}))
        assert issuer.lookup_args[-1] == {"newer_than": stored.not_before, "twins": expected}
        stored = store.load_info("www", store.versions("www")[-1]).info


LATER = NOW + timedelta(hours=1)


def listed(url: str, status: str = "pending", names: tuple[str, ...] = CERT.domains, *, profile: str | None = None,
           expires: datetime | None = LATER, ours: bool | None = None) -> resume.Listed:
    return resume.Listed(url, status, frozenset(names), profile, expires, ours)


@pytest.mark.parametrize("orders,picked", [
    ([], None),
    ([listed("a")], "a"),
    ([listed("a", "ready"), listed("b", expires=LATER + timedelta(minutes=1))], None),  # two fit: which is unknown
    ([listed("a", "ready"), listed("b", "invalid")], "a"),
    ([listed("a", names=("www.example.test",))], None),                                 # a subset of the names
    ([listed("a", names=(*CERT.domains, "x.test"))], None),                             # more names
    ([listed("a", "invalid"), listed("b", "processing")], None),
    ([listed("a", expires=NOW - timedelta(seconds=1))], None),                          # expired
    ([listed("a", "valid", ours=False)], None),                                         # another key's certificate
    ([listed("a"), listed("b", "valid", ours=True)], "b"),                              # issued already: download it
    ([listed("a", profile="shortlived")], None),                                        # another profile
    ([listed("a", profile="classic")], "a"),
])
def test_the_intent_picks_only_an_order_for_its_names_profile_and_key(orders: list[resume.Listed],
                                                                      picked: str | None) -> None:
    """Same names (as a set), same profile when both say one, the one pending/ready order not expired, or valid with its key."""
    got, why = resume.pick_order(orders, list(reversed(CERT.domains)), "classic", NOW)
    assert (got.url if got else None) == picked, why


def test_an_intent_without_a_profile_takes_no_order_naming_a_twins_profile() -> None:
    """The intent named no profile: an order naming one a twin certificate asks for was the twin's; the CA's named default is not."""
    twins = resume.Twins(profiles=frozenset({"shortlived"}))
    assert resume.pick_order([listed("a", profile="shortlived")], CERT.domains, None, NOW, twins)[0] is None
    assert resume.pick_order([listed("a", profile="default")], CERT.domains, None, NOW, twins)[0] is not None


def test_orders_held_elsewhere_or_with_a_twin_intent_are_not_picked() -> None:
    """An order another certificate's journal holds is never ours; with a twin's intent pending, no pending order is."""
    orders = [listed("a"), listed("b")]
    assert resume.pick_order(orders, CERT.domains, None, NOW, resume.Twins(frozenset({"a"})))[0] == listed("b")
    got, why = resume.pick_order(orders, CERT.domains, None, NOW, resume.Twins(frozenset({"a"}), intent=True))
    assert got is None and "intent too" in why
    valid = [listed("v", "valid", ours=True)]
    assert resume.pick_order(valid, CERT.domains, None, NOW, resume.Twins(intent=True))[0] == valid[0]


def test_an_intent_the_ca_answered_with_a_problem_is_cleared_at_once(world: Any) -> None:
    """newOrder refused (rate limited, transient): no order exists to find, so no intent is left for a lookup."""
    renew, issuer, store = world
    issuer.refusal = AcmeError("issuing www: the CA refused (rateLimited): too many orders; will retry later",
                               problem_type="urn:ietf:params:acme:error:rateLimited", transient=True,
                               where=NEW_ORDER)
    assert renew(RenewRequest(CERT)).result is Result.FAILED
    assert issuer.journal_at_intent is not None and store.load_order("www") is None


class CutOffStore(FileStore):
    """A FileStore whose intent write finds the database out of reach (as a fleet node's PgStore would)."""

    proofs = 0

    def prove_with_order(self, name: str, order: OrderJournal) -> None:
        raise StoreUnreachable("PostgreSQL store: database unreachable: no connection within 5 s")

    def check_lock(self, name: str) -> None:
        self.proofs += 1
        super().check_lock(name)


def test_a_store_out_of_reach_before_new_order_stops_the_order_without_a_second_wait(tmp_path: Path,
                                                                                      test_ca: CA) -> None:
    """The intent's write cannot reach the store: no newOrder is sent, and the lease proof is not tried again alone."""
    clock, store = FakeClock(NOW), CutOffStore(tmp_path / "state")
    issuer = OrderingCA(test_ca)
    issuer.store = store
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig(DIRECTORY), (CERT,))
    ports = Ports(config, store, store, lambda: issuer, EventBus(), clock, FakeEdges(store))
    o = Renew(ports, Planner(store, clock, lambda: issuer))(RenewRequest(CERT))
    assert o.result is Result.FAILED and "unreachable" in o.message
    assert issuer.new_orders == [] and store.proofs == 0


class ListingNet:
    """The account's orders list as a CA pages it: ``pages[url] = (orders, next url or None)``."""

    def __init__(self, pages: dict[str, tuple[list[str], str | None]]) -> None:
        self.pages, self.asked = pages, []

    def post(self, url: str, obj: Any, new_nonce_url: str = "") -> Any:
        self.asked.append(url)
        orders, following = self.pages[url]
        link = f'<{following}>;rel="next"' if following else ""
        return SimpleNamespace(json=lambda: {"orders": orders}, headers={"Link": link})


L = "https://ca.test/list-orderz/1"


@pytest.mark.parametrize("pages,urls,asked", [
    ({f"{L}/0": (["a", "b"], f"{L}/1"), f"{L}/1": (["c"], None)}, ["a", "b", "c"], 2),
    ({f"{L}/0": (["a"], "/list-orderz/1/1"), f"{L}/1": (["b"], f"{L}/0")}, ["a", "b"], 2),  # relative; looping
    ({f"{L}/{i}": ([f"o{i}"], f"{L}/{i + 1}") for i in range(30)}, [f"o{i}" for i in range(20)], 20),  # bounded
])
def test_the_orders_list_follows_next_links_within_bounds(pages: dict[str, Any], urls: list[str], asked: int) -> None:
    """Pages are followed by rel="next" until none, a page seen before, or 20 pages."""
    net = ListingNet(pages)
    client: Any = SimpleNamespace(net=net, directory={"newNonce": "https://ca.test/nonce"})
    assert lookup.listed_urls(client, f"{L}/0") == urls
    assert len(net.asked) == asked
