"""Drift detection over a real store and real deployed files, and the repair path (redeploy)."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from certd.deploy import stage as deploy
from certd.verify import drift
from certd.core.concurrency import bounded_map
from certd.core.clock import FakeClock
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, DeployConfig, VerifyEndpoint
from certd.core.errors import StoreError
from certd.engine.manager import Manager
from certd.store.files import FileStore
from tests.support.certs import make_bundle
from tests.support.procs import free_port

DOMAINS = ("www.example.test",)


def config(tmp_path: Path, *, repair: bool | None = None, daemon_repair: bool = False, **cert_kw: object) -> Config:
    cert = CertificateConfig("www", cert_kw.pop("domains", DOMAINS), **cert_kw,  # type: ignore[arg-type]
                             deploy=DeployConfig(live_dir=tmp_path / "ssl" / "www",
                                                 combined=tmp_path / "haproxy" / "www.pem", repair_drift=repair))
    return Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state", repair_drift=daemon_repair),
                  AcmeConfig("https://127.0.0.1:14000/dir"), (cert,))


def deployed(cfg: Config, versions: int = 1) -> FileStore:
    """A store with ``versions`` versions of www, the last current and deployed."""
    store = FileStore(cfg.daemon.state_dir)
    cert = cfg.certificate("www")
    for _ in range(versions):
        bundle = make_bundle(DOMAINS)
        v = store.add_version("www", bundle, {"created": "2026-01-01T00:00:00Z"})
        deploy.stage(cert, v, bundle)
        deploy.switch(cert, v)
        store.set_current("www", v)
    return store


def messages(result: drift.CertDrift) -> list[str]:
    return [m.message for m in result.mismatches]


def test_a_clean_deployment_has_no_drift(tmp_path):
    """Stored, deployed and configured agree: no mismatch, exit-0 text."""
    cfg = config(tmp_path)
    store = deployed(cfg)
    (r,) = drift.check_all(cfg, store)
    assert r.clean and r.version == 1 and r.serial == store.load("www", 1).bundle.info.serial
    assert drift.lines(drift.to_json([r])) == [f"www: OK: no drift (version 1, serial {r.serial})"]
    assert drift.to_json([r])["drift"] is False


def test_edited_content_and_widened_mode_are_one_line_each(tmp_path):
    """A byte changed in the live fullchain and a chmod of the key: two 'deployed' lines naming the paths."""
    cfg = config(tmp_path)
    store = deployed(cfg)
    live = tmp_path / "ssl" / "www"
    with open(live / "fullchain.pem", "r+b") as f:  # in place: the same inode
        f.seek(100)
        old = f.read(1)
        f.seek(100)
        f.write(b"A" if old != b"A" else b"B")
    (live / "privkey.pem").chmod(0o644)
    r = drift.check(cfg.certificate("www"), store)
    assert messages(r) == [f"www: deployed {live}/fullchain.pem: content differs from the stored version",
                           f"www: deployed {live}/privkey.pem: mode 0644, expected 0600"]
    assert r.repairable and r.kind_counts() == {"config": 0, "store": 0, "deployed": 2, "served": 0}
    assert {m.subject for m in r.mismatches} == {str(live / "fullchain.pem"), str(live / "privkey.pem")}


def test_live_dir_pointing_at_another_version_is_drift(tmp_path):
    """live_dir switched back to version 1 while the store says 2: the link is named."""
    cfg = config(tmp_path)
    store = deployed(cfg, versions=2)
    deploy.switch(cfg.certificate("www"), 1)
    r = drift.check(cfg.certificate("www"), store)
    assert f"www: deployed {tmp_path}/ssl/www: points at '.www.versions/0001', expected .www.versions/0002" in messages(r)


def test_changed_domains_are_config_drift_and_not_repairable(tmp_path):
    """A configured name the stored certificate lacks is 'config' drift: the renewal's job, not redeploy's."""
    cfg = config(tmp_path)
    store = deployed(cfg)
    changed = config(tmp_path, domains=("www.example.test", "new.example.test"))
    r = drift.check(changed.certificate("www"), store)
    assert [m.kind for m in r.mismatches] == ["config"] and not r.repairable
    assert "new.example.test" in r.mismatches[0].message


def test_an_endpoint_that_refuses_is_served_drift(tmp_path):
    """A verify endpoint nobody listens on: a 'served' line naming the endpoint and why."""
    port = free_port()
    cfg = config(tmp_path, verify=(VerifyEndpoint("127.0.0.1", port, "www.example.test"),))
    store = deployed(cfg)
    r = drift.check(cfg.certificate("www"), store)
    assert messages(r) == [f"www: 127.0.0.1:{port} (SNI www.example.test): connection refused"]
    assert r.mismatches[0].kind == "served" and r.mismatches[0].subject == f"127.0.0.1:{port}"


def test_not_issued_in_flight_and_unconfigured_are_notes_not_drift(tmp_path):
    """Nothing issued yet, a rotation mid-way, a store entry no longer configured: reported, not counted."""
    cfg = config(tmp_path)
    store = FileStore(cfg.daemon.state_dir)
    (r,) = drift.check_all(cfg, store)
    assert r.clean and r.note == "no certificate issued yet"
    store = deployed(cfg)
    store.save_journal("www", {"id": "x", "name": "www", "kind": "renew", "from_version": 1, "to_version": 2,
                               "step": "switched", "started": "2026-01-01T00:00:00Z"})
    store.add_version("old", make_bundle(("old.example.test",)), {})
    report = drift.to_json(drift.check_all(cfg, store))
    assert report["drift"] is False
    www, old = report["certificates"]
    assert "rotation is in progress at step switched" in www["note"]
    assert old["name"] == "old" and old["configured"] is False and "not configured" in old["note"]


def test_repair_is_per_certificate_else_the_daemon_default(tmp_path):
    """[certificate.deploy] repair_drift wins over [daemon] repair_drift."""
    for own, default, expected in [(None, True, True), (None, False, False), (False, True, False), (True, False, True)]:
        c = config(tmp_path, repair=own, daemon_repair=default)
        assert drift.repair_enabled(c, c.certificate("www")) is expected


def test_staging_a_live_version_refuses_edited_files_unless_repairing(tmp_path):
    """Without repair an edited live version is refused; with it, the edited files are rewritten in place."""
    cfg = config(tmp_path)
    store = deployed(cfg)
    cert, bundle = cfg.certificate("www"), store.load("www", 1).bundle
    live, combined = tmp_path / "ssl" / "www", tmp_path / "haproxy" / "www.pem"
    (live / "cert.pem").write_bytes(b"garbage\n")
    with pytest.raises(StoreError, match="is live but holds other files"):
        deploy.stage(cert, 1, bundle)
    with open(combined, "ab") as f:  # same inode as the staged copy
        f.write(b"# edited\n")
    deploy.stage(cert, 1, bundle, repair=True)
    deploy.switch(cert, 1)
    assert deploy.check(cert, 1, bundle) == []
    assert combined.read_bytes() == bundle.combined_pem and stat.S_IMODE(combined.stat().st_mode) == 0o600


def test_manager_redeploy_repairs_without_touching_the_store(tmp_path):
    """redeploy puts the current version back (link, content, mode) and leaves current and journal alone."""
    cfg = config(tmp_path)
    store = deployed(cfg, versions=2)
    cert = cfg.certificate("www")
    deploy.switch(cert, 1)
    (tmp_path / "haproxy" / "www.pem").chmod(0o644)
    outcome = Manager(cfg, store=store, clock=FakeClock(datetime.now(timezone.utc))).redeploy(cert)
    assert outcome.ok and outcome.result == "switched" and outcome.version == 2
    assert drift.check(cert, store).clean
    assert store.current("www") == 2 and store.load_journal("www") is None
    assert os.readlink(tmp_path / "ssl" / "www").endswith("0002")


def test_redeploy_without_a_certificate_does_nothing(tmp_path):
    """Nothing issued yet: redeploy says so and writes nothing."""
    cfg = config(tmp_path)
    outcome = Manager(cfg, store=FileStore(cfg.daemon.state_dir)).redeploy(cfg.certificate("www"))
    assert outcome.result == "not_due" and not (tmp_path / "ssl").exists()


def test_unreadable_current_version_is_store_drift(tmp_path):
    """A current version whose files are gone is 'store' drift, one line."""
    cfg = config(tmp_path)
    store = deployed(cfg)
    (cfg.daemon.state_dir / "certs" / "www" / "versions" / "0001" / "cert.pem").unlink()
    r = drift.check(cfg.certificate("www"), store)
    assert [m.kind for m in r.mismatches] == ["store"] and "cannot be read" in r.mismatches[0].message


def test_a_slow_check_does_not_hold_the_others_back():
    """check_all keeps at most 4 x WORKERS checks submitted (100,000 futures at once cost the
    daemon ~100 MB), refilled as any ends: the first certificate's endpoint hanging until every
    other check is done must not stall them behind it (results still in order)."""
    import threading

    others_done = threading.Event()
    finished: list[int] = []
    lock = threading.Lock()
    n = 10 * 4 * drift.WORKERS

    def check(i: int) -> str:
        if i == 0:
            waited = others_done.wait(timeout=30)  # a black-holed endpoint, for as long as the rest take
            return f"0 waited={waited}"
        with lock:
            finished.append(i)
            if len(finished) == n - 1:
                others_done.set()
        return str(i)

    results = bounded_map(check, list(range(n)), drift.WORKERS)
    assert results[0] == "0 waited=True", "the other checks queued behind the slow one"
    assert results[1:] == [str(i) for i in range(1, n)]
