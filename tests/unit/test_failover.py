"""Several CAs: the pure fallback decision (certd.core.failover) with a fake clock, the
``[[ca]]`` configuration, and the renewal's order across two fake CAs (certd.engine.failover)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, VerifyEndpoint
from certd.config.loading import load as load_config
from certd.core import failover
from certd.core.clock import FakeClock, isoformat
from certd.core.policy import RenewBefore
from certd.core.errors import AcmeError, CANotReachable, ChallengeFailed, ConfigError, HookFailed
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.effects import anchored
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports
from certd.engine.renew import Renew
from certd.engine.revoke import Revoke
from certd.store.files import FileStore
from tests.support.certs import CA, make_ca
from tests.unit.test_usecases import FakeCA, FakeEdges

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
EMERGENCY = NOW + timedelta(days=5)
P = "urn:ietf:params:acme:error:"


def limited(seconds: float | None) -> AcmeError:
    return AcmeError("rate limited", problem_type=P + "rateLimited", transient=True, retry_after=seconds)


# -- the decision table -------------------------------------------------------------------------

@pytest.mark.parametrize("error,tries,emergency,action", [
    (CANotReachable("refused"), 1, EMERGENCY, failover.RETRY),
    (CANotReachable("refused"), 2, EMERGENCY, failover.NEXT),
    (AcmeError("5xx", transient=True), 2, EMERGENCY, failover.NEXT),
    (AcmeError("oops", problem_type=P + "serverInternal", transient=True), 1, EMERGENCY, failover.RETRY),
    (AcmeError("no", problem_type=P + "rejectedIdentifier", where="newOrder"), 1, EMERGENCY, failover.NEXT),
    (AcmeError("no", problem_type=P + "caa"), 1, None, failover.NEXT),
    (AcmeError("no profile", problem_type=P + "invalidProfile", where="newOrder"), 1, EMERGENCY, failover.NEXT),
    (limited(10 * 86400), 1, EMERGENCY, failover.NEXT),      # beyond the emergency point
    (limited(3600), 1, EMERGENCY, failover.STOP),            # within it: wait for the first CA
    (limited(60), 1, None, failover.NEXT),                   # no certificate yet: any wait is too long
    (limited(None), 1, EMERGENCY, failover.STOP),
    (limited(None), 1, NOW - timedelta(seconds=1), failover.NEXT),
    (HookFailed("dns-01 hook exited 1"), 1, EMERGENCY, failover.STOP),      # our side: no other CA helps
    (ChallengeFailed("connection refused", problem_type=P + "connection", where="challenge"), 1, EMERGENCY,
     failover.NEXT),                                          # held: counts against this CA's limits
])
def test_each_kind_of_failure_tries_again_falls_to_the_next_ca_or_waits(
        error: Exception, tries: int, emergency: datetime | None, action: str) -> None:
    """Unreachable: again within the budget, then the next CA; refused: next; rate-limited past the emergency point: next, within it: wait; our side: stop."""
    clock = FakeClock(NOW)
    step = failover.after_failure(error, tries, clock.now(), emergency)
    assert step.action == action, step
    assert step.reason


def test_a_ca_refusing_or_rate_limiting_waits_per_ca_until_its_time_comes() -> None:
    """A refusal holds that CA on the hold schedule, a long rate limit until Retry-After; skipped until then, asked again after."""
    clock = FakeClock(NOW)
    held = failover.after_failure(AcmeError("no", problem_type=P + "caa"), 1, clock.now(), EMERGENCY,
                                  held_failures=2)
    assert held.kind == "held" and held.wait_until == NOW + timedelta(hours=1)
    rl = failover.after_failure(limited(10 * 86400), 1, clock.now(), EMERGENCY)
    assert rl.kind == "rate_limited" and rl.wait_until == NOW + timedelta(days=10)
    waits = {"primary": {"until": isoformat(rl.wait_until), "kind": rl.kind, "problem": "rateLimited"}}
    why = failover.waiting(waits, "primary", clock.now())
    assert why is not None and "rate limited (rateLimited) until" in why
    assert failover.waiting(waits, "backup", clock.now()) is None
    clock.advance(timedelta(days=10, seconds=1))
    assert failover.waiting(waits, "primary", clock.now()) is None


# -- configuration --------------------------------------------------------------------------------

BASE = '[daemon]\nstate_dir = "/tmp/x"\ncontrol_socket = "/tmp/x.sock"\n'
CAS = ('[[ca]]\nname = "primary"\ndirectory = "https://127.0.0.1:14000/dir"\n'
       '[[ca]]\nname = "backup"\ndirectory = "https://127.0.0.1:15000/dir"\n')
CERTS = ('[[certificate]]\nname = "www"\ndomains = ["www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n{extra}\n')


def load(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "certd.toml"
    path.write_text(text)
    return load_config(path)


def problems(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(text, tmp_path)
    return e.value.problems


def test_ca_tables_name_cas_tried_in_file_order_unless_a_certificate_names_its_own(tmp_path: Path) -> None:
    """[[ca]] tables: every CA in file order by default; ca = [...] picks and orders; config.acme is the first."""
    cfg = load(BASE + CAS + CERTS.format(extra="") + CERTS.format(extra='ca = ["backup"]').replace('"www"', '"b"'),
               tmp_path)
    assert [c.name for c in cfg.cas] == ["primary", "backup"] and cfg.acme.name == "primary"
    assert [c.name for c in cfg.cas_for(cfg.certificate("www"))] == ["primary", "backup"]
    assert [c.name for c in cfg.cas_for(cfg.certificate("b"))] == ["backup"]


def test_acme_alone_is_one_ca_named_default(tmp_path: Path) -> None:
    """Today's [acme] table still works: one CA called "default", which ca = [...] may name."""
    cfg = load(BASE + '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n' + CERTS.format(extra='ca = ["default"]'),
               tmp_path)
    assert [c.name for c in cfg.cas] == ["default"] and cfg.cas_for(cfg.certificate("www")) == (cfg.acme,)


@pytest.mark.parametrize("text,words", [
    (BASE + '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n' + CAS, "[acme] and [[ca]] tables together"),
    (BASE + CAS + CERTS.format(extra='ca = ["primary", "spare"]'), "unknown CA 'spare'; configured: primary, backup"),
    (BASE + CAS + CERTS.format(extra='ca = ["backup", "backup"]'), "'backup' is listed twice"),
    (BASE + CAS + CERTS.format(extra="ca = []"), "ca: empty"),
    (BASE + CAS.replace('"backup"', '"primary"'), "duplicate CA name 'primary'"),
    (BASE + '[[ca]]\ndirectory = "https://127.0.0.1:14000/dir"\n', "ca[0].name: required key is missing"),
    (BASE + CAS + '[[ca]]\nname = "x"\ndirectory = "https://a.test/dir"\nbogus = 1\n', "ca[2] (x).bogus"),
    (BASE + CAS.replace('"backup"', '"back up"') + CERTS.format(extra='ca = ["back up"]'),
     "'back up': expected 1-64 characters"),
    (BASE + '[ca]\nname = "primary"\ndirectory = "https://127.0.0.1:14000/dir"\n' + CERTS.format(extra='ca = ["primary"]'),
     "[[ca]] (two brackets)"),
    (BASE + CAS + '[[ca]]\nname = "x"\ndirectory = "https://a.test/dir"\nbogus = 1\n' + CERTS.format(extra='ca = ["x"]'),
     "ca[2] (x).bogus"),
])
def test_bad_ca_configuration_is_one_actionable_line(text: str, words: str, tmp_path: Path) -> None:
    """[acme] beside [[ca]], unknown or repeated CA names, an empty list, a nameless table: one line naming the fix."""
    found = problems(text, tmp_path)
    assert len(found) == 1 and words in found[0], found


def test_verify_trusts_the_issuing_cas_trust_anchors(tmp_path: Path) -> None:
    """A chain from a CA with trust_anchors is checked against them; other CAs' chains against the endpoint's own ca_bundle."""
    own, backup_roots = tmp_path / "own.pem", tmp_path / "backup-roots.pem"
    cert = replace(CertificateConfig("www", ("www.example.test",)),
                   verify=(VerifyEndpoint("127.0.0.1", 443, "www.example.test", own),))
    def trust(meta: Any) -> Path | None:
        return {"backup": backup_roots}.get(meta.get("ca"))
    assert [e.ca_bundle for e in anchored(cert, {"ca": "backup"}, trust)] == [backup_roots]
    assert [e.ca_bundle for e in anchored(cert, {"ca": "primary"}, trust)] == [own]
    assert [e.ca_bundle for e in anchored(cert, {}, trust)] == [own]


# -- the renewal across two fake CAs -----------------------------------------------------------------

CERT = CertificateConfig("www", ("www.example.test",))


class World:
    def __init__(self, tmp_path: Path, ca: CA) -> None:
        self.clock = FakeClock(NOW)
        self.store = FileStore(tmp_path / "state")
        self.cas = {"primary": FakeCA(ca, self.clock), "backup": FakeCA(ca, self.clock)}
        self.events: list[LifecycleEvent] = []
        bus = EventBus()
        bus.subscribe(self.events.append)
        primary, backup = AcmeConfig("https://p.test/dir", name="primary"), AcmeConfig("https://b.test/dir", name="backup")
        config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), primary, (CERT,),
                        cas=(primary, backup))
        self.ports = Ports(config, self.store, self.store, lambda: self.cas["primary"], bus, self.clock,
                           FakeEdges(self.store), ca_issuer=self.cas.__getitem__)
        self.planner = Planner(self.store, self.clock, lambda: self.cas["primary"],
                               issuer_at=lambda meta: self.ports.issuer_of(meta))

    def renew(self, **kw: Any) -> Any:
        return Renew(self.ports, self.planner)(RenewRequest(CERT, force=True, **kw))

    def row(self) -> dict[str, Any]:
        return self.planner.status(CERT)


@pytest.fixture(scope="module")
def test_ca() -> CA:
    return make_ca(now=NOW)


def test_a_refusing_first_ca_falls_to_the_second_which_is_recorded_and_audited(tmp_path: Path, test_ca: CA) -> None:
    """primary refuses (rejectedIdentifier): backup issues; version meta, status and the renewed event name backup and why primary was skipped."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = AcmeError("no", problem_type=P + "rejectedIdentifier", where="newOrder")
    out = w.renew()
    assert out.result == Result.RENEWED, out.message
    assert len(w.cas["primary"].orders) == 1 and len(w.cas["backup"].orders) == 1
    assert w.row()["ca"] == "backup"
    renewed = next(e for e in w.events if e.kind == "renewed")
    assert renewed.detail["ca"] == "backup"
    assert renewed.detail["ca_skipped"][0]["ca"] == "primary" and "rejectedIdentifier" in \
        renewed.detail["ca_skipped"][0]["reason"]
    # held at primary: the next scheduled renewal (due at once) goes straight to backup, with replaces
    w.clock.advance(60)
    due_now = replace(CERT, renew_before=RenewBefore(duration=timedelta(days=89, hours=23)))
    out = Renew(w.ports, w.planner)(RenewRequest(due_now))
    assert out.result == Result.RENEWED, out.message
    assert len(w.cas["primary"].orders) == 1, "a hold at primary is respected"
    assert w.cas["backup"].orders[-1] is not None, "replaces goes to the CA that issued the current one"


def test_the_first_ca_is_asked_again_once_it_answers(tmp_path: Path, test_ca: CA) -> None:
    """primary unreachable: asked twice (the budget), then backup issues; next renewal primary answers and issues again, without replaces."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    assert w.renew().result == Result.RENEWED
    assert len(w.cas["primary"].orders) == failover.TRANSIENT_BUDGET and w.row()["ca"] == "backup"
    w.cas["primary"].failure = None
    w.clock.advance(3600)
    assert w.renew().result == Result.RENEWED
    assert w.row()["ca"] == "primary" and w.cas["primary"].orders[-1] is None   # replaces only to the issuer


def test_a_rate_limit_within_the_emergency_point_waits_for_the_first_ca(tmp_path: Path, test_ca: CA) -> None:
    """With a current certificate far from its emergency point, an hour's Retry-After at primary waits: backup gets no order."""
    w = World(tmp_path, test_ca)
    assert w.renew().result == Result.RENEWED
    w.cas["primary"].failure = limited(3600)
    out = w.renew()
    assert out.result == Result.FAILED and out.message.startswith("CA primary: rate limited"), out.message
    assert len(w.cas["backup"].orders) == 0 and w.row()["state"] == "rate_limited"


def test_when_every_ca_waits_no_order_is_placed(tmp_path: Path, test_ca: CA) -> None:
    """Both CAs waiting out earlier refusals: a scheduled attempt orders nowhere and says until when."""
    w = World(tmp_path, test_ca)
    until = isoformat(NOW + timedelta(hours=2))
    state = w.planner.load_state("www")
    state.ca_waits = {n: {"until": until, "kind": "held", "problem": "caa", "count": 1} for n in w.cas}
    w.planner.save_state("www", state)
    out = Renew(w.ports, w.planner)(RenewRequest(CERT, skip_backoff=True))
    assert out.result == Result.FAILED and "every CA is waiting" in out.message
    assert not w.cas["primary"].orders and not w.cas["backup"].orders


def test_one_ca_alone_keeps_todays_behaviour(tmp_path: Path, test_ca: CA) -> None:
    """One CA unreachable: one order, no retry within the attempt, no per-CA waits recorded."""
    w = World(tmp_path, test_ca)
    w.ports = replace(w.ports, config=replace(w.ports.config, cas=(w.ports.config.acme,)))
    w.cas["primary"].failure = CANotReachable("refused")
    assert w.renew().result == Result.FAILED
    assert len(w.cas["primary"].orders) == 1 and not w.planner.load_state("www").ca_waits


class CountingCA(FakeCA):
    """A FakeCA that counts the ARI requests it is asked."""

    ari_asked = 0

    def renewal_info(self, cert_pem: bytes) -> None:
        self.ari_asked += 1
        return None


def test_ari_is_asked_of_the_ca_that_issued_the_current_certificate(tmp_path: Path, test_ca: CA) -> None:
    """After backup issued the current certificate, the scheduler's ARI request goes to backup, not primary."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: CountingCA(test_ca, w.clock) for name in w.cas})
    w.cas["primary"].failure = AcmeError("no", problem_type=P + "caa")
    assert w.renew().result == Result.RENEWED and w.row()["ca"] == "backup"
    out = Renew(w.ports, w.planner)(RenewRequest(CERT))
    assert out.result == Result.NOT_DUE
    primary, backup = w.cas["primary"], w.cas["backup"]
    assert isinstance(primary, CountingCA) and isinstance(backup, CountingCA)
    assert backup.ari_asked == 1 and primary.ari_asked == 0


def test_a_version_is_revoked_at_the_ca_that_issued_it(tmp_path: Path, test_ca: CA) -> None:
    """backup issued the current version: `revoke` asks backup, never primary."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = CANotReachable("refused")
    assert w.renew().result == Result.RENEWED
    w.cas["primary"].failure = None
    Revoke(w.ports, w.planner)(CERT, "superseded")
    assert w.cas["backup"].revoked == [4] and w.cas["primary"].revoked == []


def test_a_waiting_second_ca_does_not_hide_why_the_first_failed(tmp_path: Path, test_ca: CA) -> None:
    """backup waits out a hold, primary is unreachable: the failure recorded is primary's (transient, retried soon), not a wait."""
    w = World(tmp_path, test_ca)
    state = w.planner.load_state("www")
    state.ca_waits = {"backup": {"until": isoformat(NOW + timedelta(hours=2)), "kind": "held", "problem": "caa"}}
    w.planner.save_state("www", state)
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    out = Renew(w.ports, w.planner)(RenewRequest(CERT, skip_backoff=True))
    assert out.result == Result.FAILED and "not reachable" in out.message, out.message
    assert len(w.cas["primary"].orders) == 1 and not w.cas["backup"].orders   # the last CA asked: no retry
    after = w.planner.load_state("www")
    assert after.failure_kind == "transient" and after.ca_waits and "backup" in after.ca_waits
