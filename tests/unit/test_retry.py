"""Retry by what the CA said: the problem-type table, the held schedule, rate limits, the hold
kept across a restart and a lost state write, ``renew --force`` bypassing it once (audited),
and the duplicate-certificate limit. A fake clock and a fake CA; no network."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from certd.engine import attempts
from certd.core import retry
from certd.core.clock import FakeClock, isoformat
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.errors import AcmeError, StoreError
from certd.crypto.custody import CustodyError
from certd.core.events import LifecycleEvent
from certd.engine.manager import Manager
from certd.engine.planning import CertState
from certd.store.files import FileStore
from certd.store.port import Lease

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
URN = "urn:ietf:params:acme:error:"


# -- the table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("problem,where,kind", [
    ("badNonce", retry.NEW_ORDER, retry.TRANSIENT),
    ("serverInternal", retry.FINALIZE, retry.TRANSIENT),
    (None, None, retry.TRANSIENT),                      # connection refused, timeout, a hook
    ("rateLimited", retry.NEW_ORDER, retry.RATE_LIMITED),
    ("caa", retry.CHALLENGE, retry.HELD),
    ("rejectedIdentifier", retry.NEW_ORDER, retry.HELD),
    ("unsupportedIdentifier", retry.NEW_ORDER, retry.HELD),
    ("unauthorized", retry.NEW_ORDER, retry.HELD),
    ("badCSR", retry.FINALIZE, retry.HELD),
    ("badSignatureAlgorithm", retry.FINALIZE, retry.HELD),
    ("dns", retry.CHALLENGE, retry.HELD),
    ("connection", retry.CHALLENGE, retry.HELD),
    ("incorrectResponse", retry.CHALLENGE, retry.HELD),
    ("tls", retry.CHALLENGE, retry.HELD),
    ("unauthorized", retry.CHALLENGE, retry.HELD),
    ("unauthorized", retry.REPLACES, retry.TRANSIENT),  # replaces is advisory: not a refusal
    ("alreadyReplaced", retry.REPLACES, retry.TRANSIENT),
    ("somethingNew", retry.NEW_ORDER, retry.TRANSIENT),  # unknown: today's backoff
])
def test_each_problem_type_maps_to_a_kind(problem: str | None, where: str | None, kind: str) -> None:
    """The table, as the CA would send it (full URN)."""
    assert retry.rule_for(URN + problem if problem else None, where).kind == kind


def test_every_rule_cites_its_rfc_and_every_hold_says_what_to_fix() -> None:
    """Each rule names the RFC (or draft) that defines its problem type; each hold says what to fix."""
    for (code, _where), rule in retry.RULES.items():
        assert rule.kind in retry.KINDS
        assert "RFC 8555" in rule.cite or "RFC 9773" in rule.cite or "draft-ietf-acme-" in rule.cite, code
        assert rule.kind != retry.HELD or rule.fix, code


def test_held_waits_20_minutes_then_doubles_from_an_hour_to_a_day() -> None:
    delays = [retry.hold_delay(n) for n in range(1, 10)]
    assert delays[:6] == [timedelta(minutes=20), timedelta(hours=1), timedelta(hours=2), timedelta(hours=4),
                          timedelta(hours=8), timedelta(hours=16)]
    assert delays[6:] == [timedelta(hours=24)] * 3
    # never more than 3 attempts per name per hour (Let's Encrypt allows 5 failed validations)
    t, tries = NOW, [NOW]
    for n in range(1, 4):
        t = retry.next_allowed(retry.HELD, n, t, timedelta(seconds=1))
        tries.append(t)
    assert sum(1 for x in tries if x < NOW + timedelta(hours=1)) <= 3


def test_a_first_connection_failure_is_retried_after_30_s_then_held_on_the_usual_schedule() -> None:
    """A row of held refusals started by `connection` at the challenge: 30 s, then 20 min, 1 h ...;
    one started by another held kind keeps 20 min, 1 h, even when `connection` comes second."""
    conn = retry.rule_for(URN + "connection", retry.CHALLENGE)
    wrong = retry.rule_for(URN + "incorrectResponse", retry.CHALLENGE)

    def waits(rules: list[retry.Rule]) -> list[timedelta]:
        kind, count, out = None, 0, []
        for rule in rules:
            count, kind = retry.count_after(rule, kind, count), rule.kind
            out.append(retry.next_allowed(kind, count, NOW, timedelta(seconds=1)) - NOW)
        return out

    assert waits([conn, conn, conn, conn]) == [timedelta(seconds=30), timedelta(minutes=20), timedelta(hours=1),
                                               timedelta(hours=2)]
    assert waits([conn, wrong, conn]) == [timedelta(seconds=30), timedelta(minutes=20), timedelta(hours=1)]
    assert waits([wrong, conn, conn]) == [timedelta(minutes=20), timedelta(hours=1), timedelta(hours=2)]
    transient = retry.rule_for(None, None)
    assert waits([conn, transient, conn])[2] == timedelta(seconds=30)   # another kind ended the row
    assert [r for r in retry.RULES.values() if r.retry_first] == [conn]  # the one early retry
    # still at most 3 tries per name in the first hour (Let's Encrypt allows 5 failed validations)
    tries = [NOW + sum(waits([conn] * n), timedelta()) for n in range(4)]
    assert sum(1 for x in tries if x < NOW + timedelta(hours=1)) == 3


def test_the_early_retry_is_granted_at_most_once_an_hour_per_certificate() -> None:
    """`connection`, a transient failure, `connection` again within the hour: the second holds
    20 min (the transient one ended the row, and used to give it 30 s again); an hour after the
    early retry, a `connection` row starts with 30 s again. The hour outlasts a success."""
    conn, down = refusal("connection", retry.CHALLENGE), AcmeError("CA not answering", transient=True)
    state = CertState()

    def fail(error: AcmeError, at: datetime) -> timedelta:
        attempts.note_failure(state, error, at, timedelta(seconds=1))
        assert state.retry_after is not None
        return datetime.fromisoformat(state.retry_after.replace("Z", "+00:00")) - at

    assert fail(conn, NOW) == retry.FIRST_RETRY
    assert fail(down, NOW + timedelta(minutes=1)) == timedelta(seconds=1)
    assert fail(conn, NOW + timedelta(minutes=2)) == timedelta(minutes=20)   # within the hour
    assert fail(down, NOW + timedelta(minutes=30)) == timedelta(seconds=1)
    attempts.clear(state)                                                      # a success between
    assert fail(conn, NOW + timedelta(minutes=59)) == timedelta(minutes=20)
    assert fail(down, NOW + timedelta(minutes=70)) == timedelta(seconds=1)
    assert fail(conn, NOW + timedelta(minutes=81)) == retry.FIRST_RETRY       # an hour after: early again
    assert state.early_retry == isoformat(NOW + timedelta(minutes=81))
    state.early_retry = "not a time"                                           # hand-edited: as if none
    assert fail(down, NOW + timedelta(minutes=82)) == timedelta(seconds=1)
    assert fail(conn, NOW + timedelta(minutes=83)) == retry.FIRST_RETRY


def test_rate_limited_waits_for_retry_after_and_for_the_backoff() -> None:
    b = timedelta(minutes=2)
    assert retry.next_allowed(retry.RATE_LIMITED, 1, NOW, b, NOW + timedelta(seconds=30)) == NOW + b
    assert retry.next_allowed(retry.RATE_LIMITED, 1, NOW, b, NOW + timedelta(hours=3)) == NOW + timedelta(hours=3)
    assert retry.next_allowed(retry.TRANSIENT, 3, NOW, b) == NOW + b


# -- through the manager, with a fake CA ---------------------------------------------------------

class RefusingCA:
    """An issuer whose every order fails with ``error``; counts the orders."""

    def __init__(self, error: Exception) -> None:
        self.error, self.orders = error, 0

    def issue(self, cert: Any, key_pem: bytes, *, replaces: str | None = None, progress: Any = None,
              on_order: Any = None, before: Any = None) -> bytes:
        self.orders += 1
        raise self.error

    def renewal_info(self, cert_pem: bytes) -> None:
        return None

    def close(self) -> None:
        pass


def refusal(code: str, where: str, retry_after: float | None = None) -> AcmeError:
    e = AcmeError(f"issuing www: the CA said {code}", problem_type=URN + code, detail="no", retry_after=retry_after)
    e.where = where  # type: ignore[attr-defined]
    return e


CERT = CertificateConfig("www", ("blocked.example.test",))


def make(tmp_path: Path, clock: FakeClock, ca: RefusingCA, store: FileStore | None = None) -> tuple[Manager, list[LifecycleEvent]]:
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CERT,))
    m = Manager(cfg, store=store or FileStore(cfg.daemon.state_dir), issuer=ca, clock=clock)  # type: ignore[arg-type]
    seen: list[LifecycleEvent] = []
    m.events.subscribe(seen.append)
    return m, seen


def test_a_permanent_refusal_holds_across_a_restart_and_force_bypasses_it_once(tmp_path: Path) -> None:
    """rejectedIdentifier on newOrder: one order, then nothing for 20 minutes — also after a
    restart (a new Manager on the same state) — status says held, why, and how to try now;
    renew --force tries at once and the audit says it bypassed the hold."""
    clock, ca = FakeClock(NOW), RefusingCA(refusal("rejectedIdentifier", retry.NEW_ORDER))
    m, _ = make(tmp_path, clock, ca)
    assert m.renew_one(CERT).result == "failed" and ca.orders == 1
    for _ in range(10):
        clock.advance(60)
        assert m.renew_one(CERT).result == "not_due"
    assert ca.orders == 1

    m2, seen = make(tmp_path, clock, ca)  # a restart: the hold is in the state
    row = m2.status(CERT)
    assert row["state"] == "held" and row["failure_kind"] == "held" and row["problem"] == "rejectedIdentifier"
    assert row["retry_after"] == isoformat(NOW + timedelta(minutes=20))
    assert "certd renew --force www" in row["renewal_reason"] and "remove the name" in row["renewal_reason"]
    assert "not retrying" not in json.dumps(row)
    assert m2.renew_one(CERT).result == "not_due" and ca.orders == 1

    assert m2.renew_one(CERT, force=True, reason="fixed the name").result == "failed" and ca.orders == 2
    forced = [e for e in seen if e.kind == "forced"]
    assert forced[0].detail["bypassed"]["failure_kind"] == "held"
    # the second refusal in a row holds for an hour from now
    assert m2.status(CERT)["retry_after"] == isoformat(clock.now() + timedelta(hours=1))

    clock.advance(timedelta(hours=1, seconds=1))
    assert m2.renew_one(CERT).result == "failed" and ca.orders == 3


def test_the_emergency_point_never_cuts_a_hold_below_20_minutes(tmp_path: Path) -> None:
    """A failed validation for a short-lived certificate past its emergency point still waits."""
    from tests.support.certs import make_bundle
    clock, ca = FakeClock(NOW), RefusingCA(refusal("incorrectResponse", retry.CHALLENGE))
    m, _ = make(tmp_path, clock, ca)
    bundle = make_bundle(("blocked.example.test",), not_before=NOW - timedelta(hours=1), days=1 / 12)
    m.store.set_current("www", m.store.add_version("www", bundle, {}))
    assert m.renew_one(CERT).result == "failed"
    clock.advance(timedelta(minutes=19))
    assert m.renew_one(CERT).result == "not_due" and ca.orders == 1
    clock.advance(timedelta(minutes=1, seconds=1))
    assert m.renew_one(CERT).result == "failed" and ca.orders == 2


def test_a_connection_failure_is_retried_after_30_s_and_a_second_one_holds_20_minutes(tmp_path: Path) -> None:
    """The CA saw EOF from a node killed under its validation (`connection`): status says held
    until 30 s later, not 20 min; the retry then goes out, and a second `connection` in a row
    holds 20 min."""
    clock, ca = FakeClock(NOW), RefusingCA(refusal("connection", retry.CHALLENGE))
    m, _ = make(tmp_path, clock, ca)
    assert m.renew_one(CERT).result == "failed" and ca.orders == 1
    row = m.status(CERT)
    assert (row["state"], row["problem"]) == ("held", "connection")
    assert row["retry_after"] == isoformat(NOW + timedelta(seconds=30))
    clock.advance(29)
    assert m.renew_one(CERT).result == "not_due" and ca.orders == 1
    clock.advance(2)
    assert m.renew_one(CERT).result == "failed" and ca.orders == 2
    assert m.status(CERT)["retry_after"] == isoformat(clock.now() + timedelta(minutes=20))
    clock.advance(timedelta(minutes=19))
    assert m.renew_one(CERT).result == "not_due" and ca.orders == 2


def test_the_early_retry_once_an_hour_is_kept_across_a_restart(tmp_path: Path) -> None:
    """`connection` (retried after 30 s), then the CA not answering, then a restart and
    `connection` again within the hour: held 20 min, not 30 s (the state keeps the early
    retry's time); the CA saw 3 orders, not a fourth 30 s later."""
    clock, ca = FakeClock(NOW), RefusingCA(refusal("connection", retry.CHALLENGE))
    m, _ = make(tmp_path, clock, ca)
    assert m.renew_one(CERT).result == "failed"
    assert m.status(CERT)["retry_after"] == isoformat(NOW + retry.FIRST_RETRY)
    clock.advance(31)
    ca.error = AcmeError("issuing www: CA not answering", transient=True)
    assert m.renew_one(CERT).result == "failed" and ca.orders == 2
    m2, _ = make(tmp_path, clock, ca)  # a restart: the early retry's time is in the state
    ca.error = refusal("connection", retry.CHALLENGE)
    while ca.orders == 2 and clock.now() < NOW + timedelta(minutes=30):  # the transient backoff
        clock.advance(10)
        m2.renew_one(CERT)
    assert ca.orders == 3 and clock.now() < NOW + timedelta(minutes=30)
    assert m2.status(CERT)["retry_after"] == isoformat(clock.now() + timedelta(minutes=20))
    clock.advance(31)
    assert m2.renew_one(CERT).result == "not_due" and ca.orders == 3


def test_rate_limited_is_not_retried_before_retry_after(tmp_path: Path) -> None:
    clock, ca = FakeClock(NOW), RefusingCA(refusal("rateLimited", retry.NEW_ORDER, retry_after=3600))
    m, _ = make(tmp_path, clock, ca)
    m.renew_one(CERT)
    row = m.status(CERT)
    assert (row["state"], row["retry_after"]) == ("rate_limited", isoformat(NOW + timedelta(hours=1)))
    clock.advance(timedelta(minutes=59))
    assert m.renew_one(CERT).result == "not_due" and ca.orders == 1
    clock.advance(timedelta(minutes=1, seconds=1))
    m.renew_one(CERT)
    assert ca.orders == 2


class FullDisk(FileStore):
    """A state directory whose state writes fail (ENOSPC), as with a full disk."""

    full = False

    def write_state(self, name: str, state: dict[str, Any], *, expected: str | None,
                    lease: Lease | None = None) -> str:
        if self.full:
            raise StoreError(f"writing the state of {name}: [Errno 28] No space left on device")
        return super().write_state(name, state, expected=expected, lease=lease)


def test_a_lost_state_write_never_makes_the_next_try_sooner(tmp_path: Path) -> None:
    """Transient failures on a full state disk: the in-memory floor keeps the backoff growing
    (1 s, 2 s, 4 s ...) instead of retrying at every look."""
    clock, ca = FakeClock(NOW), RefusingCA(AcmeError("issuing www: serverInternal", transient=True))
    store = FullDisk(tmp_path / "state")
    store.full = True
    m, _ = make(tmp_path, clock, ca, store)
    for _ in range(60):  # a minute of looks, one a second
        m.renew_one(CERT)
        clock.advance(1)
    assert 3 <= ca.orders <= 6, ca.orders   # 2 s, 4 s, 8 s, 16 s, 32 s backoff: not 60 orders
    assert m.load_state("www").failures == ca.orders


def test_a_hold_survives_a_lost_state_write(tmp_path: Path) -> None:
    clock, ca = FakeClock(NOW), RefusingCA(refusal("caa", retry.CHALLENGE))
    store = FullDisk(tmp_path / "state")
    store.full = True
    m, _ = make(tmp_path, clock, ca, store)
    m.renew_one(CERT)
    for _ in range(19):
        clock.advance(60)
        m.renew_one(CERT)
    assert ca.orders == 1


def test_the_duplicate_limit_refuses_a_sixth_forced_renewal_in_a_week(tmp_path: Path) -> None:
    clock, ca = FakeClock(NOW), RefusingCA(AcmeError("should not be asked"))
    m, _ = make(tmp_path, clock, ca)
    state = CertState()
    for day in range(5):
        attempts.note_issued(state, ["blocked.example.test"], NOW - timedelta(days=6, hours=-day))
    m.save_state("www", state)
    o = m.renew_one(CERT, force=True)
    assert o.result == "refused" and ca.orders == 0
    assert "duplicate-certificate limit is 5" in o.message
    assert isoformat(NOW + timedelta(days=1)) in o.message and "--ignore-duplicate-limit" in o.message
    assert m.renew_one(CERT, force=True, ignore_duplicate_limit=True).result == "failed" and ca.orders == 1
    clock.advance(timedelta(days=1, seconds=1))  # the oldest left the rolling week
    m.save_state("www", CertState(issued=state.issued))
    assert m.renew_one(CERT, force=True).result == "failed" and ca.orders == 2


def test_only_a_process_that_retries_says_will_retry() -> None:
    """Issue 13 item 13: the one-shot CLI never says "will retry"; the daemon does, and a hold
    says when the next try is and how to try now — "not retrying" nowhere."""
    transient = CertState(failures=1, failure_kind=retry.TRANSIENT)
    msg = "issuing www: the CA refused (serverInternal): boom; will retry"
    assert attempts.next_step(msg, "www", transient, NOW, retries=True) == "issuing www: the CA refused (serverInternal): boom; will retry"
    cli = attempts.next_step(msg, "www", transient, NOW, retries=False)
    assert "will retry" not in cli and "certd renew www again later" in cli

    held = CertState(failures=1, failure_kind=retry.HELD, retry_after=isoformat(NOW + timedelta(minutes=20)))
    refused = "issuing www: the CA refused (caa): no; a CAA record forbids this CA; fix the CAA records; not retrying"
    for retries in (True, False):
        text = attempts.next_step(refused, "www", held, NOW, retries)
        assert "not retrying" not in text and "will retry" not in text
        assert "fix the CAA records" in text and "certd renew --force www" in text
        assert "2026-11-22T12:20:00Z" in text


def test_the_cli_says_no_will_retry_through_the_manager(tmp_path: Path) -> None:
    clock, ca = FakeClock(NOW), RefusingCA(AcmeError("issuing www: timed out; will retry", transient=True))
    m, _ = make(tmp_path, clock, ca)
    assert "will retry" not in m.renew_one(CERT).message
    m.retries = True
    clock.advance(3600)
    assert m.renew_one(CERT).message.endswith("; will retry")


def test_a_forced_renewal_that_failed_transiently_is_retried_on_the_backoff(tmp_path: Path) -> None:
    """Issue 11 item 5: a forced renewal failing on a transient error (a badNonce storm) is
    retried on the backoff, not left "failing" until the normal renewal date weeks away."""
    from tests.support.certs import make_bundle
    clock, ca = FakeClock(NOW), RefusingCA(refusal("badNonce", retry.NEW_ORDER))
    m, _ = make(tmp_path, clock, ca)
    bundle = make_bundle(("blocked.example.test",), not_before=NOW, days=90)
    m.store.set_current("www", m.store.add_version("www", bundle, {}))
    assert m.renew_one(CERT, force=True, reason="rotate now").result == "failed"
    row = m.status(CERT)
    when, why = datetime.fromisoformat(row["next_renewal"].replace("Z", "+00:00")), row["renewal_reason"]
    assert when - NOW <= timedelta(seconds=66) and "forced renewal (rotate now)" in why, (when, why)
    clock.advance(when - NOW + timedelta(seconds=1))
    assert m.renew_one(CERT).result == "failed" and ca.orders == 2   # retried without being asked again


class SealedOutOfReach(FileStore):
    """A state directory whose stored keys cannot be opened: the KEK's token was pulled."""

    pulled = False

    def load(self, name: str, version: int) -> Any:
        if self.pulled:
            raise CustodyError("PKCS#11 token 'certd' is unavailable: not found in libsofthsm2.so (tokens present: "
                               "none); plug it in, or fix the token= label in kek")
        return super().load(name, version)


def test_a_stored_key_that_cannot_be_opened_is_a_failed_attempt_backed_off(tmp_path: Path) -> None:
    """A KEK token pulled under the daemon: each look fails before ordering, is counted, and the next
    look waits for the backoff instead of polling ARI again at once (a loop of ~15 attempts a second)."""
    from tests.support.certs import make_bundle
    clock, ca = FakeClock(NOW), RefusingCA(AcmeError("should not be asked"))
    store = SealedOutOfReach(tmp_path / "state")
    m, _ = make(tmp_path, clock, ca, store)
    bundle = make_bundle(("blocked.example.test",), not_before=NOW - timedelta(days=1), days=90)
    store.set_current("www", store.add_version("www", bundle, {}))
    store.pulled = True
    for _ in range(60):  # the daemon looks again whenever plan() says so; a minute of it
        when, _why = m.plan(CERT)
        if when <= clock.now():
            assert m.renew_one(CERT).result == "failed"
        clock.advance(1)
    state = m.load_state("www")
    assert 1 <= state.failures <= 6 and ca.orders == 0, state.failures
    assert "PKCS#11 token 'certd' is unavailable" in (state.last_error or "")
