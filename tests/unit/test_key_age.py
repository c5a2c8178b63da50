"""max_key_age: a key is replaced once it is that old, even while its certificate is valid and
even with reuse_key; the policy says which rule decided. Pure policy with fixed times, then the
renew use case and status over fake ports and a fake clock."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import pytest

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, RenewBefore
from certd.core.clock import FakeClock, isoformat
from certd.core.events import EventBus, LifecycleEvent
from certd.core.policy import Facts, decide, needs_new_key
from certd.engine import keyage
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.renew import Renew
from certd.store.files import FileStore
from tests.support.certs import CA, make_ca
from tests.unit.test_usecases import FakeCA, FakeEdges

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)
CLASS_RULES = (("key_type", "default"), ("reuse_key", "key_class critical"), ("max_key_age", "key_class critical"),
               ("renew_before", "default"), ("keep_versions", "default"), ("destroy_after", "default"))


def _facts(days: float = 90, key_age: timedelta = timedelta(0), max_age: timedelta | None = 30 * DAY,
           **kw: object) -> Facts:
    return Facts(not_before=T0, not_after=T0 + timedelta(days=days), key_created=T0 - key_age,
                 max_key_age=max_age, **kw)  # type: ignore[arg-type]


def test_the_key_age_point_wins_when_it_comes_before_the_renewal_point() -> None:
    """A 90-day certificate whose key has a 30-day limit is due when the key turns 30 days old."""
    d = decide(_facts(key_rule="key_class critical"), T0 + DAY, random.Random(1))
    assert d.renew_at == T0 + 30 * DAY
    assert d.reason == "key older than max_key_age 30d (key_class critical)"
    assert not d.is_due(T0 + 29 * DAY) and d.is_due(T0 + 30 * DAY)


def test_a_key_reused_from_an_older_certificate_is_due_by_its_own_age() -> None:
    """The age counts from the key's creation, not from the certificate's notBefore."""
    d = decide(_facts(key_age=29 * DAY, key_rule="certificate"), T0 + DAY, random.Random(1))
    assert d.renew_at == T0 + DAY and d.is_due(T0 + DAY)
    assert d.reason == "key older than max_key_age 30d (certificate)"


def test_a_later_key_age_point_leaves_the_usual_decision_alone() -> None:
    """A 400-day limit on a 90-day certificate changes nothing: the lifetime rule decides."""
    without = decide(_facts(max_age=None), T0, random.Random(1))
    d = decide(_facts(max_age=400 * DAY), T0, random.Random(1))
    assert d == without and "1/3 of lifetime left" in d.reason


def test_a_class_renew_before_is_named_in_the_reason() -> None:
    """When a key class set renew_before, the reason says so."""
    d = decide(_facts(max_age=None, renew_before=RenewBefore(fraction=Fraction(1, 2)),
                      renew_before_rule="key_class critical"), T0, random.Random(1))
    assert d.reason == "renew_before 1/2 of lifetime left (key_class critical)"


def test_failures_still_back_off_from_a_key_age_point() -> None:
    """A failing renewal for an old key is retried on the backoff, not in a tight loop."""
    d = decide(_facts(key_age=31 * DAY, failures=3, last_failure=T0 + DAY), T0 + DAY, random.Random(1))
    assert d.renew_at > T0 + DAY and "retry 3 after failure" in d.reason


@pytest.mark.parametrize("age,cycle,expected", [
    (timedelta(days=31), timedelta(0), "the key is older than max_key_age 30d"),
    (timedelta(days=25), timedelta(days=6), "the key would pass max_key_age 30d before the next renewal"),
    (timedelta(days=25), timedelta(days=4), None),
    (timedelta(seconds=5), timedelta(seconds=-3), None),
])
def test_a_renewal_reuses_the_key_only_while_it_stays_young_enough(age: timedelta, cycle: timedelta,
                                                                   expected: str | None) -> None:
    """reuse_key keeps the key unless it is too old now or would be before the next renewal."""
    assert needs_new_key(T0 - age, 30 * DAY, T0, cycle) == expected
    assert needs_new_key(T0 - age, None, T0, cycle) is None


def test_a_versions_key_age_falls_back_to_when_it_was_stored() -> None:
    """Versions stored before key_created existed use their created time, then notBefore."""
    from tests.support.certs import make_bundle
    info = make_bundle(not_before=T0).info
    assert keyage.key_created({"key_created": "2026-10-01T00:00:00Z", "created": "x"}, info) == \
        datetime(2026, 10, 1, tzinfo=timezone.utc)
    assert keyage.key_created({"created": "2026-10-02T00:00:00Z"}, info) == datetime(2026, 10, 2, tzinfo=timezone.utc)
    assert keyage.key_created({"created": "garbage"}, info) == info.not_before
    assert keyage.key_age_days(T0 - timedelta(hours=36), T0) == 1.5 and keyage.key_age_days(None, T0) is None


# -- the renew use case and status ----------------------------------------------------------

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
CRITICAL = CertificateConfig("www", ("www.example.test",), reuse_key=True, key_class="critical",
                             max_key_age=float(10 * 86400), origins=CLASS_RULES)


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca(now=NOW)


def _world(tmp_path: Path, ca: CA, cert: CertificateConfig) -> tuple[Renew, Planner, FakeClock, FileStore,
                                                                     list[LifecycleEvent]]:
    clock = FakeClock(NOW)
    store = FileStore(tmp_path / "state")
    issuer, edges, bus = FakeCA(ca, clock), FakeEdges(store), EventBus()
    seen: list[LifecycleEvent] = []
    bus.subscribe(seen.append)
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                    AcmeConfig("https://127.0.0.1:14000/dir"), (cert,))
    planner = Planner(store, clock, lambda: issuer)
    return Renew(Ports(config, store, store, lambda: issuer, bus, clock, edges), planner), planner, clock, store, seen


def test_max_key_age_renews_a_valid_certificate_with_a_new_key_despite_reuse_key(tmp_path: Path, ca: CA) -> None:
    """reuse_key keeps the key while it is young; at max_key_age the certificate is due and gets a new key."""
    renew, planner, clock, store, seen = _world(tmp_path, ca, CRITICAL)
    assert renew(RenewRequest(CRITICAL)).result == Result.RENEWED
    first = store.load("www", 1)
    assert first.meta["key_created"] == isoformat(NOW)

    clock.advance(timedelta(days=1))  # a forced renewal while young: the key is reused, its age kept
    assert renew(RenewRequest(CRITICAL, force=True)).result == Result.RENEWED
    second = store.load("www", 2)
    assert second.bundle.key_pem == first.bundle.key_pem and second.meta["key_created"] == isoformat(NOW)
    row = planner.status(CRITICAL)
    assert (row["key_class"], row["key_age_days"]) == ("critical", 1.0)
    assert row["renewal_reason"] == "key older than max_key_age 10d (key_class critical)"
    assert row["next_renewal"] == isoformat(NOW + timedelta(days=10))
    assert json.loads(planner.status_json(CRITICAL))["key_age_days"] == 1.0

    clock.advance(timedelta(days=8, hours=23))
    assert renew(RenewRequest(CRITICAL)).result == Result.NOT_DUE
    clock.advance(timedelta(hours=1))
    o = renew(RenewRequest(CRITICAL))
    assert (o.result, o.version) == (Result.RENEWED, 3)
    third = store.load("www", 3)
    assert third.bundle.key_pem != first.bundle.key_pem and third.meta["key_created"] == isoformat(clock.now())
    assert third.meta["reason"] == "key older than max_key_age 10d (key_class critical)"
    assert [e.reason for e in seen if e.kind == "renewed"][-1] == third.meta["reason"]
    assert planner.status(CRITICAL)["key_age_days"] == 0.0


def test_without_a_key_class_status_shows_nulls_and_reasons_are_unchanged(tmp_path: Path, ca: CA) -> None:
    """A certificate without a class: key_class null, key_age_days still reported, no rule suffix."""
    plain = CertificateConfig("www", ("www.example.test",))
    renew, planner, clock, _, _ = _world(tmp_path, ca, plain)
    assert planner.status(plain)["key_age_days"] is None  # nothing issued yet
    renew(RenewRequest(plain))
    clock.advance(timedelta(hours=12))
    row = planner.status(plain)
    assert (row["key_class"], row["key_age_days"]) == (None, 0.5)
    assert "key_class" not in row["renewal_reason"] and "(certificate)" not in row["renewal_reason"]


def test_a_class_key_type_change_names_the_class(tmp_path: Path, ca: CA) -> None:
    """A key class that changes key_type makes the certificate due, and the reason names the class."""
    renew, planner, _, _, _ = _world(tmp_path, ca, CertificateConfig("www", ("www.example.test",)))
    renew(RenewRequest(CertificateConfig("www", ("www.example.test",))))
    p384 = replace(CRITICAL, key_type="ecdsa-p384",
                   origins=(("key_type", "key_class critical"),) + CLASS_RULES[1:])
    assert planner.status(p384)["renewal_reason"] == \
        "configured key_type ecdsa-p384 (key_class critical) differs from the certificate's ecdsa-p256"
