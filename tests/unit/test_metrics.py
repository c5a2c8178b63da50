"""Metrics: store-backed gauges from the first scrape, counters fed by lifecycle events, outputs."""

from __future__ import annotations

import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from certd.core import rotation
from certd.core.clock import FakeClock
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, Listen
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.manager import Manager
from certd.engine.planning import CertState
from certd.ops.metrics import Metrics
from certd.core.rotation import Step
from certd.store.files import FileStore
from tests.support.certs import make_bundle
from tests.support.procs import free_port

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def setup(tmp_path: Path, names: tuple[str, ...] = ("www", "api"), **daemon: object) -> tuple[Metrics, Manager]:
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state", **daemon),  # type: ignore[arg-type]
                 AcmeConfig("https://127.0.0.1:14000/dir"),
                 tuple(CertificateConfig(n, (f"{n}.example.test",)) for n in names))
    metrics = Metrics(cfg)
    bus = EventBus()
    bus.subscribe(metrics.on_event)
    bus.subscribe_measurements(metrics.on_measure)
    manager = Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=FakeClock(NOW), events=bus)
    metrics.bind(manager)
    return metrics, manager


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics.exposition().decode()) for s in fam.samples}


def get(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str) -> float | None:
    return m.get((metric, tuple(sorted(labels.items()))))


def store_version(manager: Manager, name: str) -> int:
    bundle = make_bundle((f"{name}.example.test",), not_before=NOW, days=30)
    v = manager.store.add_version(name, bundle, {"created": "2026-03-01T11:59:00Z"})
    manager.store.set_current(name, v)
    return v


def test_gauges_come_from_the_store_before_any_event(tmp_path):
    """Right after a start: expiry, not-before, issuance, version and next renewal of what is stored."""
    metrics, manager = setup(tmp_path)
    store_version(manager, "www")
    state = CertState(last_success="2026-03-01T11:59:30Z", failures=2)
    manager.save_state("www", state)
    m = samples(metrics)
    info = manager.store.load("www", 1).bundle.info
    assert get(m, "certd_certificate_expiration_timestamp_seconds", name="www") == info.not_after.timestamp()
    assert get(m, "certd_certificate_not_before_timestamp_seconds", name="www") == info.not_before.timestamp()
    assert get(m, "certd_certificate_issued_timestamp_seconds", name="www") == datetime(2026, 3, 1, 11, 59, tzinfo=timezone.utc).timestamp()
    assert get(m, "certd_certificate_version", name="www") == 1
    assert get(m, "certd_last_success_timestamp_seconds", name="www") == datetime(2026, 3, 1, 11, 59, 30, tzinfo=timezone.utc).timestamp()
    assert get(m, "certd_certificate_consecutive_failures", name="www") == 2
    nxt = get(m, "certd_certificate_next_renewal_timestamp_seconds", name="www")
    assert nxt is not None and NOW.timestamp() < nxt < info.not_after.timestamp()
    assert get(m, "certd_certificate_version", name="api") is None  # nothing stored: no made-up values
    assert get(m, "certd_renewals_total", name="api", result="failed") == 0  # but counters start at zero


def test_events_feed_the_counters(tmp_path):
    """Renewed, failed, rolled back (verify failed), rollback failed and operator rollback are counted."""
    metrics, manager = setup(tmp_path)
    for kind, kw in [("renewed", {}), ("renewal_failed", {"outcome": "failed"}),
                     ("rolled_back", {"detail": {"failed_step": "verify"}}),
                     ("renewal_failed", {"outcome": "rolled_back", "detail": {"failed_step": "verify"}}),
                     ("rollback_failed", {"detail": {"failed_step": "reload"}}), ("operator_rollback", {}),
                     ("renewal_failed", {"outcome": "deployed_unverified", "detail": {"failed_step": "verify"}})]:
        manager.emit(kind, "www", **kw)
    m = samples(metrics)
    assert {r: get(m, "certd_renewals_total", name="www", result=r) for r in
            ("success", "failed", "rolled_back", "rollback_failed", "deployed_unverified")} == \
        {"success": 1, "failed": 1, "rolled_back": 1, "rollback_failed": 0, "deployed_unverified": 1}
    assert {r: get(m, "certd_rollbacks_total", name="www", result=r) for r in ("success", "failed", "operator")} == \
        {"success": 1, "failed": 1, "operator": 1}
    assert get(m, "certd_verification_failures_total", name="www") == 2  # the rollback and the first issuance


def test_durations_and_drift(tmp_path):
    """ACME requests and hooks land in histograms; the drift gauge has every kind."""
    metrics, manager = setup(tmp_path)
    manager.events.measure("acme_request", 0.02)
    manager.events.measure("hook", 0.3, hook="nginx -c /etc/nginx/nginx.conf")
    metrics.set_drift("www", {"deployed": 2})
    m = samples(metrics)
    assert get(m, "certd_acme_request_duration_seconds_count") == 1
    assert get(m, "certd_hook_duration_seconds_bucket", hook="nginx -c /etc/nginx/nginx.conf", le="0.5") == 1
    assert get(m, "certd_drift", name="www", kind="deployed") == 2
    assert get(m, "certd_drift", name="www", kind="served") == 0
    assert get(m, "certd_drift", name="api", kind="deployed") is None  # never checked: no series yet
    metrics.set_drift("www", {})  # repaired: every kind back to 0, the series stay
    m = samples(metrics)
    assert [get(m, "certd_drift", name="www", kind=k) for k in ("config", "store", "deployed", "served")] == [0] * 4


def test_a_removed_certificate_loses_its_series(tmp_path):
    """After a reload without 'api', its counters and drift gauges are gone; a new name starts at zero."""
    metrics, manager = setup(tmp_path)
    metrics.set_drift("api", {})
    cfg = manager.config
    new = Config(cfg.path, cfg.daemon, cfg.acme, (cfg.certificates[0], CertificateConfig("new", ("new.example.test",))))
    manager.reconfigure(new)  # the daemon reconfigures both
    metrics.reconfigure(new)
    m = samples(metrics)
    assert not [k for k in m if ("name", "api") in k[1]]
    assert get(m, "certd_renewals_total", name="new", result="success") == 0


def test_endpoint_and_textfile(tmp_path):
    """/metrics answers on the configured loopback port; the textfile is written 0644, whole."""
    port = free_port()
    textfile = tmp_path / "certd.prom"
    metrics, manager = setup(tmp_path, metrics_listen=Listen("127.0.0.1", port), metrics_textfile=textfile)
    store_version(manager, "www")
    metrics.start()
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'certd_certificate_version{name="www"} 1.0' in body
        metrics.write_textfile()
        assert 'certd_certificate_version{name="www"} 1.0' in textfile.read_text()
        assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    finally:
        metrics.stop()


def test_failed_action_names_the_step_that_failed():
    """The journal's history tells which action sent it rolling back (verify) or failed (stage)."""
    j = rotation.start("www", "renew", 1, 2, NOW, initiator="t", reason="")
    for action, error in [(rotation.Action.STAGE, None), (rotation.Action.SWITCH, None),
                          (rotation.Action.RELOAD, None), (rotation.Action.VERIFY, "served the old one")]:
        j = rotation.advance(j, action, error, NOW)
    assert j.step == Step.ROLLING_BACK and rotation.failed_action(j) == rotation.Action.VERIFY
    j = rotation.advance(j, rotation.Action.ROLL_BACK, None, NOW)
    assert rotation.failed_action(j) == rotation.Action.VERIFY
    k = rotation.advance(rotation.start("www", "renew", 1, 2, NOW, initiator="t", reason=""),
                         rotation.Action.STAGE, "disk full", NOW)
    assert rotation.failed_action(k) == rotation.Action.STAGE
    assert rotation.failed_action(rotation.start("www", "renew", 1, 2, NOW, initiator="t", reason="")) is None


def test_events_without_a_failed_step_are_still_counted(tmp_path):
    """Older events (no detail) count as rollbacks without guessing a verification failure."""
    metrics, _ = setup(tmp_path)
    metrics.on_event(LifecycleEvent("rolled_back", "www", NOW))
    m = samples(metrics)
    assert get(m, "certd_rollbacks_total", name="www", result="success") == 1
    assert get(m, "certd_verification_failures_total", name="www") == 0


def test_a_broken_certificate_is_flagged_and_the_others_still_exported(tmp_path):
    """www's stored version vanished: certd_certificate_broken{www} is 1, its status row says
    broken with the reason, a cert_broken event is emitted once, and api's gauges are intact."""
    import shutil
    metrics, manager = setup(tmp_path)
    seen: list[LifecycleEvent] = []
    manager.events.subscribe(seen.append)
    store_version(manager, "www")
    store_version(manager, "api")
    shutil.rmtree(manager.store.root / "certs" / "www" / "versions" / "0001")
    m = samples(metrics)
    assert get(m, "certd_certificate_broken", name="www") == 1
    assert get(m, "certd_certificate_broken", name="api") == 0
    assert get(m, "certd_certificate_version", name="api") == 1
    row = manager.status(manager.config.certificate("www"))
    assert row["state"] == "broken" and row["broken_reason"]
    manager.status(manager.config.certificate("www"))
    assert [e.kind for e in seen if e.name == "www"] == ["cert_broken"]


def test_a_fleet_database_out_of_reach_keeps_the_last_known_facts_and_breaks_nothing(tmp_path, monkeypatch):
    """The fleet's database goes away (a failover): every certificate keeps the status row it
    had, none is flagged broken and no cert_broken record is written for each
    name — the daemon's store_down says it once. (Seen in the fleet soak: a PostgreSQL restart
    turned certificates 'broken' with a cert_broken audit record apiece.)"""
    from certd.core.errors import StoreUnreachable
    metrics, manager = setup(tmp_path)
    seen: list[LifecycleEvent] = []
    manager.events.subscribe(seen.append)
    store_version(manager, "www")
    before = manager.status(manager.config.certificate("www"))
    assert before["version"] == 1

    def away(*_: object, **__: object) -> None:
        raise StoreUnreachable("PostgreSQL store: database unreachable: connection refused")
    for method in ("change_token", "current", "load", "load_info", "versions", "load_state"):
        monkeypatch.setattr(manager.store, method, away, raising=False)
    assert get(samples(metrics), "certd_certificate_broken", name="www") != 1  # skipped while unreadable
    row = manager.status(manager.config.certificate("www"))
    assert row["state"] != "broken" and row["version"] == 1, row
    assert [e.kind for e in seen if e.kind == "cert_broken"] == []
    when, why = manager.plan(manager.config.certificate("www"))  # not "now" in a loop while it is away
    assert when >= NOW + timedelta(seconds=30), (when, why)


def test_a_late_record_of_a_committed_rotation_touches_nothing_but_the_audit(tmp_path):
    """A process committed version 2 and died before its 'renewed' record; since then the
    version was pruned and a later attempt left a hold in the state. The next start records the
    renewal (no serial: the version is gone), marks the journal, keeps the state as it is, and a
    second start records nothing more (seen in review: finish() re-read the pruned version
    strictly and failed every attempt for ever, and reset the later hold)."""
    _, manager = setup(tmp_path)
    seen: list[LifecycleEvent] = []
    manager.events.subscribe(seen.append)
    store_version(manager, "www")
    j = rotation.start("www", "renew", 1, 2, NOW, initiator="scheduler", reason="due")
    for step in (Step.STAGED, Step.SWITCHED, Step.RELOADED, Step.VERIFIED, Step.COMMITTED):
        j = rotation.advance(j, {Step.STAGED: rotation.Action.STAGE, Step.SWITCHED: rotation.Action.SWITCH,
                                 Step.RELOADED: rotation.Action.RELOAD, Step.VERIFIED: rotation.Action.VERIFY,
                                 Step.COMMITTED: rotation.Action.COMMIT}[step], None, NOW)
    j = replace(j, extra={**j.extra, "recorded": False})
    assert j.step == Step.COMMITTED
    manager.store.save_journal("www", j.to_json())
    manager.save_state("www", CertState(failures=2, failure_kind="held", retry_after="2026-03-01T13:00:00Z"))
    manager.recover_all()
    renewed = [e for e in seen if e.kind == "renewed"]
    assert [(e.version, e.new_serial, e.detail.get("recorded_late")) for e in renewed] == [(2, None, True)]
    state = manager.load_state("www")
    assert (state.failures, state.failure_kind, state.retry_after) == (2, "held", "2026-03-01T13:00:00Z")
    manager.recover_all()
    assert len([e for e in seen if e.kind == "renewed"]) == 1


def test_a_scrape_reads_each_versions_metadata_not_the_whole_version(tmp_path, monkeypatch):
    """The issued timestamp comes from meta.json: a first scrape of 100,000 certificates that
    loaded every version (key read, chain parsed) took 148 s of the daemon's CPU."""
    metrics, manager = setup(tmp_path)
    for name in ("www", "api"):
        store_version(manager, name)
    loads: list[tuple[str, int]] = []
    real_load = manager.store.load
    monkeypatch.setattr(manager.store, "load", lambda name, v: loads.append((name, v)) or real_load(name, v))
    m = samples(metrics)
    assert get(m, "certd_certificate_issued_timestamp_seconds", name="api") == \
        datetime(2026, 3, 1, 11, 59, tzinfo=timezone.utc).timestamp()
    assert loads == []

