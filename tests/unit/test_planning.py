"""Planner: status rows and plans come from a cache that never outlives what it was built from."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from certd.clock import FakeClock
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.manager import Manager
from certd.planning import CertState
from certd.store import FileStore
from tests.support.certs import make_bundle

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def make(tmp_path: Path, clock: FakeClock) -> Manager:
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CertificateConfig("www", ("www.example.test",)),))
    return Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=clock)


def add(manager: Manager, days: float) -> str:
    bundle = make_bundle(("www.example.test",), not_before=NOW, days=days)
    manager.store.set_current("www", manager.store.add_version("www", bundle, {}))
    return bundle.info.serial


def test_status_follows_every_store_change_and_the_clock(tmp_path: Path) -> None:
    """A new version, a failure, a revocation mark and time passing each show at once."""
    clock = FakeClock(NOW)
    m = make(tmp_path, clock)
    cert = m.config.certificates[0]
    assert m.status(cert)["state"] == "missing"
    first = add(m, days=9)
    row = m.status(cert)
    assert (row["serial"], row["state"], row["version"]) == (first, "ok", 1)
    assert m.status(cert) == row  # the cached row, unchanged

    m.save_state("www", CertState(failures=2, last_error="CA not reachable"))
    assert (m.status(cert)["state"], m.status(cert)["failures"]) == ("failing", 2)
    m.save_state("www", CertState())

    second = add(m, days=9)
    assert (m.status(cert)["serial"], m.status(cert)["version"]) == (second, 2)

    m.store.update_meta("www", 2, {"revoked": {"reason": "superseded"}})
    assert m.status(cert)["state"] == "revoked"
    m.store.update_meta("www", 2, {"revoked": None})

    renew_at = datetime.fromisoformat(m.status(cert)["next_renewal"].replace("Z", "+00:00"))
    clock.advance(renew_at - clock.now() + timedelta(seconds=1))  # due: decided again, not cached
    assert m.plan(cert)[0] <= clock.now()
    clock.advance(NOW + timedelta(days=9, seconds=1) - clock.now())
    assert m.status(cert)["state"] == "expired"


def test_an_equal_configuration_after_a_reload_keeps_the_cache_and_a_changed_one_does_not(tmp_path: Path) -> None:
    """A reload makes new certificate objects: equal ones reuse the facts, changed domains re-decide."""
    clock = FakeClock(NOW)
    m = make(tmp_path, clock)
    add(m, days=30)
    before = m.plan(m.config.certificates[0])
    same = CertificateConfig("www", ("www.example.test",))
    assert m.plan(same) == before
    changed = CertificateConfig("www", ("www.example.test", "api.example.test"))
    when, why = m.plan(changed)
    assert when == clock.now() and "differ" in why
