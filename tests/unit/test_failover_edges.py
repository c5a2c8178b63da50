"""Several CAs, the edges a review found: an order journaled at a CA that is down, a failure at the
last CA whose wait must not lock out the others, dry runs with [[ca]] tables."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from acme import messages

from certd.acme import resume
from certd.acme.account import Account
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, VerifyEndpoint
from certd.config.loading import load as load_config
from certd.core import failover
from certd.core.clock import FakeClock, isoformat
from certd.core.policy import RenewBefore
from certd.core.errors import AcmeError, CANotReachable, ConfigError, UsageError
from certd.core.events import EventBus
from certd.engine.dryrun import dry_run
from certd.engine.effects import LocalEdges, anchored
from certd.engine.manager import Manager
from certd.engine.ports import Ports
from certd.store.files import FileStore
from certd.engine.outcome import RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.renew import Renew
from certd.engine.revoke import Revoke
from certd.store.port import OrderJournal
from certd.crypto import keys
from tests.support.certs import CA, make_ca
from tests.unit.test_failover import CERT, NOW, P, World, limited
from tests.unit.test_usecases import FakeCA, FakeEdges


@pytest.fixture(scope="module")
def test_ca() -> CA:
    return make_ca(now=NOW)


class ResumingCA(FakeCA):
    """A FakeCA that also answers ``resume`` (failing while ``failure`` is set)."""

    resumed = 0

    def resume(self, cert: CertificateConfig, order_url: str, key_pem: bytes, *, progress: Any = None,
               before: Any = None) -> bytes | None:
        self.resumed += 1
        if self.failure is not None:
            raise self.failure
        return None


def test_an_order_journaled_at_a_ca_that_is_down_does_not_stop_the_fallback(tmp_path: Path, test_ca: CA) -> None:
    """A crash left an order at primary, then primary went down: the renewal falls to backup instead of failing on the resume every time."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: ResumingCA(test_ca, w.clock) for name in w.cas})
    key = keys.generate_private_key(CERT.key_type)
    w.store.save_order("www", OrderJournal("https://p.test/order/1", key, "2026-11-22T11:00:00Z",
                                           resume.journal_meta("https://p.test/dir", CERT.identifiers, None,
                                                               CERT.key_type)))
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    out = w.renew()
    assert out.result == Result.RENEWED, out.message
    assert w.row()["ca"] == "backup" and len(w.cas["backup"].orders) == 1
    assert w.store.load_order("www") is None, "the abandoned order is not resumed after backup issued"


class IntendingCA(ResumingCA):
    """A ResumingCA whose ``issue`` proves the lease (and journals the intent) before newOrder."""

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None,
              progress: Any = None, on_order: Any = None, before: Any = None) -> bytes:
        if before is not None:
            before("newOrder")
        return super().issue(cert, key_pem, replaces=replaces, progress=progress, on_order=on_order)


def test_an_order_journaled_at_a_ca_that_is_down_outlives_a_refusal_at_the_next(tmp_path: Path, test_ca: CA) -> None:
    """primary's journaled order cannot be continued (primary down); backup refuses newOrder: primary's order is still journaled, to be finished when primary answers (no second certificate)."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: IntendingCA(test_ca, w.clock) for name in w.cas})
    key = keys.generate_private_key(CERT.key_type)
    w.store.save_order("www", OrderJournal("https://p.test/order/1", key, "2026-11-22T11:00:00Z",
                                           resume.journal_meta("https://p.test/dir", CERT.identifiers, None,
                                                               CERT.key_type)))
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    w.cas["backup"].failure = AcmeError("the CA refused (rejectedIdentifier)", problem_type=P + "rejectedIdentifier",
                                        where="newOrder")
    assert w.renew().result == Result.FAILED
    kept = w.store.load_order("www")
    assert kept is not None and kept.order_url == "https://p.test/order/1" and kept.key_pem == key, kept
    assert len(w.cas["backup"].orders) == 1


def test_a_journaled_order_whose_ca_is_down_is_said_to_have_been_tried_once(tmp_path: Path, test_ca: CA) -> None:
    """The CA of a journaled order is asked once to continue it: the skip names one try, not the budget of two."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: ResumingCA(test_ca, w.clock) for name in w.cas})
    w.store.save_order("www", OrderJournal("https://p.test/order/1", keys.generate_private_key(CERT.key_type),
                                           "2026-11-22T11:00:00Z",
                                           resume.journal_meta("https://p.test/dir", CERT.identifiers, None,
                                                               CERT.key_type)))
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    assert w.renew().result == Result.RENEWED
    renewed = next(e for e in w.events if e.kind == "renewed")
    (skip,) = renewed.detail["ca_skipped"]
    assert w.cas["primary"].resumed == 1 and len(w.cas["primary"].orders) == 0
    assert skip["ca"] == "primary" and "not answering after 1 try" in skip["reason"], skip


def test_a_long_wait_at_the_last_ca_does_not_lock_out_a_first_ca_that_was_only_down(tmp_path: Path,
                                                                                      test_ca: CA) -> None:
    """First issuance: primary down, backup rate-limits for 30 days: the certificate retries on the short backoff, not in 30 days."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    w.cas["backup"].failure = limited(30 * 86400)
    assert w.renew().result == Result.FAILED
    row = w.row()
    assert row["retry_after"] is None or row["retry_after"] < "2026-11-23", row
    w.cas["primary"].failure = None
    w.clock.advance(timedelta(hours=1, minutes=10))
    out = Renew(w.ports, w.planner)(RenewRequest(CERT))
    assert out.result == Result.RENEWED, out.message
    assert w.row()["ca"] == "primary" and len(w.cas["backup"].orders) == 1


@pytest.mark.parametrize("backup_wait", [3 * 86400, 30 * 86400])  # within / beyond the emergency point
def test_a_first_ca_that_is_down_while_the_backup_waits_is_flagged_ca_unreachable(tmp_path: Path, test_ca: CA,
                                                                                   backup_wait: int) -> None:
    """primary down, backup rate-limited: the failure is 'CA unreachable' (status says so; the CA probe retries once primary answers)."""
    w = World(tmp_path, test_ca)
    assert w.renew().result == Result.RENEWED
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    w.cas["backup"].failure = limited(backup_wait)
    out = w.renew()
    assert out.result == Result.FAILED
    state = w.planner.load_state("www")
    assert state.ca_unreachable, state
    assert "primary not answering" in (state.last_error or ""), state.last_error
    assert w.row()["ca_unreachable"] is True
    w.cas["primary"].failure = None
    assert w.renew().result == Result.RENEWED
    assert w.planner.load_state("www").ca_unreachable is False and w.row()["ca_unreachable"] is False


def test_when_every_ca_waits_after_an_attempt_the_certificate_waits_for_the_first_of_them(tmp_path: Path,
                                                                                          test_ca: CA) -> None:
    """primary refuses (held 20 min), backup rate-limits for 30 days: the certificate may try again after 20 min, not 30 days."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = AcmeError("no", problem_type=P + "caa")
    w.cas["backup"].failure = limited(30 * 86400)
    out = w.renew()
    assert out.result == Result.FAILED
    state = w.planner.load_state("www")
    assert state.retry_after is not None and state.retry_after <= "2026-11-22T12:20:01Z", state.retry_after
    w.cas["primary"].failure = None
    w.clock.advance(timedelta(minutes=21))
    out = Renew(w.ports, w.planner)(RenewRequest(CERT))
    assert out.result == Result.RENEWED, out.message
    assert w.row()["ca"] == "primary"


# -- dry runs with [[ca]] tables ------------------------------------------------------------------

def _dry_config(tmp_path: Path, primary_staging: str, backup_staging: str | None, cert_ca: str) -> Any:
    backup = f'staging_directory = "{backup_staging}"\n' if backup_staging else ""
    text = (f'[daemon]\nstate_dir = "{tmp_path}/state"\ncontrol_socket = "{tmp_path}/s.sock"\n'
            '[[ca]]\nname = "primary"\ndirectory = "https://127.0.0.1:9/dir"\n'
            f'staging_directory = "{primary_staging}"\n'
            f'[[ca]]\nname = "backup"\ndirectory = "https://127.0.0.1:9/backup"\n{backup}'
            '[[certificate]]\nname = "www"\ndomains = ["www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'
            f'{cert_ca}\n')
    path = tmp_path / "certd.toml"
    path.write_text(text)
    return load_config(path)


def test_a_dry_run_orders_from_the_staging_directory_of_the_certificates_own_first_ca(tmp_path: Path) -> None:
    """ca = ["backup"]: the dry run goes to backup's staging directory, not the first [[ca]] table's."""
    cfg = _dry_config(tmp_path, "https://127.0.0.1:9/primary-staging", "https://127.0.0.1:9/backup-staging",
                      'ca = ["backup"]')
    store = FileStore(tmp_path / "state")
    ports = Ports(cfg, store, store, lambda: FakeCA(make_ca(now=NOW), FakeClock(NOW)), EventBus(), FakeClock(NOW),
                  FakeEdges(store))
    out = dry_run(ports, list(cfg.certificates), None, "operator")
    assert "backup-staging" in out[0].message and "primary-staging" not in out[0].message, out[0].message


def test_a_dry_run_whose_first_ca_has_no_staging_directory_names_that_ca(tmp_path: Path) -> None:
    """ca = ["backup"] without a staging directory there: refused in one line naming [[ca]] "backup", not [acme]."""
    cfg = _dry_config(tmp_path, "https://127.0.0.1:9/primary-staging", None, 'ca = ["backup"]')
    store = FileStore(tmp_path / "state")
    ports = Ports(cfg, store, store, lambda: FakeCA(make_ca(now=NOW), FakeClock(NOW)), EventBus(), FakeClock(NOW),
                  FakeEdges(store))
    with pytest.raises(UsageError) as e:
        dry_run(ports, list(cfg.certificates), None, "operator")
    assert 'no [[ca]] "backup" staging_directory (www\'s first CA)' in str(e.value) and "\n" not in str(e.value)


# -- the issuing CA after the [[ca]] tables changed -------------------------------------------------

class AriCA(ResumingCA):
    """A FakeCA counting the ARI requests it is asked."""

    ari_asked = 0

    def renewal_info(self, cert_pem: bytes) -> None:
        self.ari_asked += 1
        return None


def _renamed(w: World, old: str, new: str) -> None:
    """The [[ca]] table ``old`` renamed ``new`` (same directory); the CA client is the same one."""
    cfg = w.ports.config
    cas = tuple(replace(c, name=new) if c.name == old else c for c in cfg.cas)
    w.cas[new] = w.cas.pop(old)

    def issuer(name: str) -> Any:
        if name not in w.cas:
            raise AcmeError(f"no CA named {name!r} is configured (any more)")
        return w.cas[name]
    w.ports = replace(w.ports, config=replace(cfg, acme=cas[0], cas=cas), ca_issuer=issuer)


def test_a_renamed_ca_table_still_revokes_asks_ari_and_replaces_at_the_ca_that_issued(tmp_path: Path,
                                                                                       test_ca: CA) -> None:
    """backup issued the current version, then its [[ca]] table was renamed zerossl (same directory): revoke, ARI and replaces still go there."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: AriCA(test_ca, w.clock) for name in w.cas})
    w.cas["primary"].failure = CANotReachable("refused")
    assert w.renew().result == Result.RENEWED and w.row()["ca"] == "backup"
    w.cas["primary"].failure = AcmeError("no", problem_type=P + "caa")
    _renamed(w, "backup", "zerossl")
    w.planner = Planner(w.store, w.clock, lambda: w.cas["primary"], issuer_at=lambda m: w.ports.issuer_of(m))
    assert Renew(w.ports, w.planner)(RenewRequest(CERT)).result == Result.NOT_DUE
    zerossl = w.cas["zerossl"]
    assert isinstance(zerossl, AriCA) and zerossl.ari_asked == 1
    assert w.renew().result == Result.RENEWED
    assert zerossl.orders[-1] is not None, "replaces goes to the CA that issued the current certificate"
    w.cas["primary"].failure = None
    Revoke(w.ports, w.planner)(CERT, "superseded")
    assert zerossl.revoked == [4] and w.cas["primary"].revoked == []


def test_a_version_from_before_several_cas_belongs_to_the_ca_named_default(tmp_path: Path, test_ca: CA) -> None:
    """A version without "ca" in its meta (issued by [acme], now [[ca]] name = "default" second): ARI and replaces go to default."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: AriCA(test_ca, w.clock) for name in w.cas})
    w.ports = replace(w.ports, config=replace(w.ports.config, cas=(w.ports.config.cas[0],)))  # [acme] alone
    assert w.renew().result == Result.RENEWED
    w.store.update_meta("www", 1, {"ca": None, "ca_directory": None})  # as before [[ca]]
    _renamed(w, "primary", "default")
    cfg = w.ports.config
    backup = AcmeConfig("https://b.test/dir", name="backup")
    w.ports = replace(w.ports, config=replace(cfg, acme=backup, cas=(backup, cfg.cas[0])))
    w.cas["backup"] = AriCA(test_ca, w.clock)
    w.planner = Planner(w.store, w.clock, lambda: w.cas["backup"], issuer_at=lambda m: w.ports.issuer_of(m))
    assert Renew(w.ports, w.planner)(RenewRequest(CERT)).result == Result.NOT_DUE
    default, backup_ca = w.cas["default"], w.cas["backup"]
    assert isinstance(default, AriCA) and isinstance(backup_ca, AriCA)
    assert default.ari_asked == 1 and backup_ca.ari_asked == 0


def test_revoking_a_version_whose_ca_is_gone_says_how_to_revoke_it(tmp_path: Path, test_ca: CA) -> None:
    """backup issued the current version and its [[ca]] table was removed: revoke fails in one line saying to add it back, and asks no other CA."""
    w = World(tmp_path, test_ca)
    w.cas["primary"].failure = CANotReachable("refused")
    assert w.renew().result == Result.RENEWED and w.row()["ca"] == "backup"
    w.cas["primary"].failure = None
    cfg = w.ports.config
    w.ports = replace(w.ports, config=replace(cfg, cas=(cfg.cas[0],)))
    out = Revoke(w.ports, w.planner)(CERT, "superseded")
    assert out.result == Result.FAILED and "CA 'backup' (https://b.test/dir)" in out.message
    assert "add its [[ca]] table back" in out.message and "\n" not in out.message
    assert w.cas["primary"].revoked == [] and w.cas["backup"].revoked == []


# -- the daemon's CA probe --------------------------------------------------------------------------

def test_the_ca_probe_asks_only_cas_that_would_be_ordered_from() -> None:
    """A CA waiting out a hold answers the probe but would be skipped: only the CAs not waiting are worth probing (no retry loop against the CA still down)."""
    until = isoformat(NOW + timedelta(hours=2))
    waits = {"backup": {"until": until, "kind": "held", "problem": "caa"}}
    assert failover.worth_probing(("primary", "backup"), waits, NOW) == ["primary"]
    assert failover.worth_probing(("primary", "backup"), waits, NOW + timedelta(hours=3)) == ["primary", "backup"]
    assert failover.worth_probing(("backup",), waits, NOW) == ["backup"], "one CA alone: always probed"


def test_a_short_rate_limit_at_the_backup_does_not_hold_back_a_first_ca_that_was_only_down(tmp_path: Path,
                                                                                           test_ca: CA) -> None:
    """primary down, backup rate-limits for 3 days (within the emergency point): the certificate retries primary on the short backoff, not in 3 days."""
    w = World(tmp_path, test_ca)
    assert w.renew().result == Result.RENEWED
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    w.cas["backup"].failure = limited(3 * 86400)
    assert w.renew().result == Result.FAILED
    assert w.row()["retry_after"] is None, w.row()
    state = w.planner.load_state("www")
    assert state.ca_waits and "backup" in state.ca_waits, "backup is skipped until its Retry-After"
    stored = w.store.load("www", w.store.current("www"))
    due = w.planner.decide(CERT, stored, state, refresh_ari=False)
    assert due.renew_at <= w.clock.now() + timedelta(hours=1, minutes=10), due  # the forced renewal's retry
    w.cas["primary"].failure = None
    w.clock.advance(due.renew_at - w.clock.now())
    assert w.renew().result == Result.RENEWED and w.row()["ca"] == "primary"
    assert len(w.cas["backup"].orders) == 1, "primary issued: backup not asked again"


# -- messages name the [[ca]] table to fix ------------------------------------------------------------

def test_a_ca_configuration_problem_names_the_ca_table_not_acme(tmp_path: Path) -> None:
    """The backup CA requires External Account Binding: the error names [[ca]] "backup", where the keys go, not an [acme] table the file does not have."""
    cfg = _dry_config(tmp_path, "https://127.0.0.1:9/primary-staging", None, "")
    backup = cfg.ca_config("backup")
    assert backup is not None
    directory = messages.Directory({"meta": messages.Directory.Meta(external_account_required=True)})
    with pytest.raises(ConfigError) as e:
        Account(backup, None, None, None)._eab(directory)  # type: ignore[arg-type]
    assert str(e.value).startswith('[[ca]] "backup" eab_kid: the CA at https://127.0.0.1:9/backup'), str(e.value)
    assert cfg.acme.table == '[[ca]] "primary"'


def test_a_first_ca_rate_limiting_within_the_emergency_point_is_waited_for_though_the_backup_wait_ends_sooner(
        tmp_path: Path, test_ca: CA) -> None:
    """backup held for 20 min, primary rate-limits for 2 h (within the emergency point): the certificate waits the 2 h for primary, not 20 min to order from backup."""
    w = World(tmp_path, test_ca)
    assert w.renew().result == Result.RENEWED
    state = w.planner.load_state("www")
    state.ca_waits = {"backup": {"until": isoformat(w.clock.now() + timedelta(minutes=20)), "kind": "held",
                                 "problem": "caa", "count": 1}}
    w.planner.save_state("www", state)
    w.cas["primary"].failure = limited(7200)
    due_now = replace(CERT, renew_before=RenewBefore(duration=timedelta(days=89, hours=23)))
    out = Renew(w.ports, w.planner)(RenewRequest(due_now))
    assert out.result == Result.FAILED
    assert w.planner.load_state("www").retry_after >= isoformat(w.clock.now() + timedelta(hours=2))


def test_verify_keeps_trusting_the_issuing_cas_anchors_after_its_table_is_renamed(tmp_path: Path,
                                                                                   test_ca: CA) -> None:
    """backup (with trust_anchors) issued the version, its [[ca]] table was renamed zerossl: verify still trusts those anchors."""
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"")
    primary = AcmeConfig("https://p.test/dir", name="primary", table='[[ca]] "primary"')
    zerossl = AcmeConfig("https://b.test/dir", name="zerossl", table='[[ca]] "zerossl"', trust_anchors=roots)
    cert = replace(CERT, verify=(VerifyEndpoint("127.0.0.1", 443, "www.example.test", tmp_path / "own.pem"),))
    config = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"), primary, (cert,),
                    cas=(primary, zerossl))
    mgr = Manager(config, store=FileStore(tmp_path / "state"), issuer=FakeCA(test_ca, FakeClock(NOW)))
    meta = {"ca": "backup", "ca_directory": "https://b.test/dir"}
    edges = mgr.ports.edges
    assert isinstance(edges, LocalEdges)
    assert [e.ca_bundle for e in anchored(cert, meta, edges.trust)] == [roots]


def test_a_ca_whose_directory_url_changed_still_issued_its_versions() -> None:
    """The [acme] directory moved to a new URL (a proxy in front, a new endpoint): the version it issued still belongs to that CA, so ARI, replaces and revoke keep going to it."""
    old = AcmeConfig(directory="https://ca.test/dir", name="default")
    moved = replace(old, directory="https://proxy.test/dir")
    cfg = Config(Path("/x/certd.toml"), DaemonConfig(), moved, (), cas=(moved,))
    meta = {"ca": "default", "ca_directory": old.directory}
    assert cfg.issuing_ca(meta) is moved
    renamed_elsewhere = replace(old, name="backup")  # the directory decides over the name when both exist
    two = Config(Path("/x/certd.toml"), DaemonConfig(), moved, (), cas=(moved, renamed_elsewhere))
    assert two.issuing_ca(meta) is renamed_elsewhere


# -- resuming another node's order (the fleet's reconcile pass) -------------------------------------

def _resume_only(w: World) -> Any:
    return Renew(w.ports, w.planner)(RenewRequest.resuming(CERT, "node2"))


def _journal_with(w: World, key: bytes, created: str) -> None:
    w.store.save_order("www", OrderJournal("https://p.test/order/9", key, created,
                                           resume.journal_meta("https://p.test/dir", CERT.identifiers, None,
                                                               CERT.key_type)))


def test_resuming_an_order_whose_certificate_is_stored_orders_nothing(tmp_path: Path, test_ca: CA) -> None:
    """A node stored the version and died before clearing the order journal: the node that resumes finds the certificate stored and orders nothing (one certificate per renewal)."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: ResumingCA(test_ca, w.clock) for name in w.cas})
    assert w.renew().result == Result.RENEWED
    stored = w.store.load("www", w.store.current("www"))
    _journal_with(w, stored.bundle.key_pem, "2026-11-22T11:00:00Z")  # written before that version was stored
    orders = sum(len(ca.orders) for ca in w.cas.values())
    out = _resume_only(w)
    assert out.result == Result.NOT_DUE, out.message
    assert sum(len(ca.orders) for ca in w.cas.values()) == orders, "no new order"
    assert w.store.versions("www") == [1] and w.store.load_order("www") is None


def test_resuming_an_order_whose_ca_failed_waits_out_the_backoff(tmp_path: Path, test_ca: CA) -> None:
    """The journaled order's CA is down: the resume fails once, and the next reconcile passes neither ask the CA again before the backoff ends nor audit a forced renewal; no other CA gets a fresh order."""
    w = World(tmp_path, test_ca)
    w.cas.update({name: ResumingCA(test_ca, w.clock) for name in w.cas})
    assert w.renew().result == Result.RENEWED  # version 1, from primary
    orders = {name: len(ca.orders) for name, ca in w.cas.items()}
    w.events.clear()
    w.clock.advance(3600)
    _journal_with(w, keys.generate_private_key(CERT.key_type), isoformat(w.clock.now()))
    w.cas["primary"].failure = CANotReachable("ACME server https://p.test/dir is not reachable (refused)")
    assert _resume_only(w).result == Result.FAILED
    asked = w.cas["primary"].resumed
    for _ in range(3):  # reconcile passes a poke or the interval brings, within the backoff
        w.clock.advance(1)
        assert _resume_only(w).result == Result.NOT_DUE
    assert w.cas["primary"].resumed == asked, "not asked again within the backoff"
    assert {name: len(ca.orders) for name, ca in w.cas.items()} == orders, "a resume never orders afresh"
    assert not [e for e in w.events if e.kind == "forced"]
    w.clock.advance(7200)  # past the backoff: tried again
    assert _resume_only(w).result == Result.FAILED and w.cas["primary"].resumed == asked + 1
