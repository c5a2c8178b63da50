"""The fleet database probe (certd.daemon.storehealth): up/down with since, the gauge, what
``certd status`` says while the database is unreachable, and the emergency-point line."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.config.schema import DeployConfig
from certd.core.clock import FakeClock
from certd.core.errors import OperationFailed
from certd.daemon.storehealth import StoreHealth, degraded_row
from tests.support.certs import make_bundle

T0 = datetime(2027, 1, 1, tzinfo=timezone.utc)


class FakeDatabase:
    """A connect() that answers while ``up`` and refuses like libpq otherwise."""

    def __init__(self) -> None:
        self.up = True
        self.queries: list[str] = []

    def __call__(self, dsn: str, timeout: int) -> FakeDatabase:
        if not self.up:
            raise OSError('connection to server at "db" failed: Connection refused')
        return self

    def __enter__(self) -> FakeDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, sql: str) -> None:
        self.queries.append(sql)


def config(tmp_path: Path, live: Path) -> Config:
    cert = CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(live_dir=live))
    return Config(tmp_path / "c.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig("https://127.0.0.1/dir"),
                  (cert,))


def deploy(live: Path, not_before: datetime, days: float) -> Any:
    bundle = make_bundle(days=days, not_before=not_before)
    live.mkdir(parents=True, exist_ok=True)
    (live / "fullchain.pem").write_bytes(bundle.fullchain_pem)
    return bundle.info


def gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("certd_store_up", {"node": "web1"})


def test_probe_flips_down_and_up_with_since_and_gauge(tmp_path: Path) -> None:
    """A refused connection makes the node down (gauge 0, since = then), an answer up again."""
    clock, db, registry = FakeClock(T0), FakeDatabase(), CollectorRegistry()
    health = StoreHealth("host=db", "web1", clock, connect=db)
    health.register(registry)
    assert health.probe() and gauge(registry) == 1.0 and db.queries == ["SELECT 1"]
    db.up = False
    clock.advance(60)
    assert not health.probe() and gauge(registry) == 0.0
    assert health.since == T0 + timedelta(seconds=60) and "Connection refused" in (health.error or "")
    clock.advance(60)
    health.probe()
    assert health.since == T0 + timedelta(seconds=60)  # still down: since is when it went
    db.up = True
    assert health.probe() and gauge(registry) == 1.0 and health.lines() == []


def test_status_while_down_reads_the_deployed_files_only(tmp_path: Path) -> None:
    """Rows say store_unreachable with the deployed serial and notAfter; one line says since when."""
    live = tmp_path / "live" / "www"
    info = deploy(live, T0 - timedelta(days=10), 90)
    cfg = config(tmp_path, live)
    db = FakeDatabase()
    health = StoreHealth("host=db", "web1", FakeClock(T0), connect=db, config=lambda: cfg)
    db.up = False
    health.probe()
    row = degraded_row(cfg.certificates[0], health.since)
    assert (row["state"], row["serial"], row["fingerprint_sha256"]) == \
        ("store_unreachable", info.serial, info.fingerprint_sha256)
    lines = health.lines()
    assert len(lines) == 1 and lines[0].startswith("database: UNREACHABLE from node web1 since 2027-01-01")
    with pytest.raises(OperationFailed, match="no order is placed without it"):
        health.refuse_order()


def test_past_the_emergency_point_while_down_says_it_will_not_order_alone(tmp_path: Path) -> None:
    """A deployed certificate in its last tenth, database down: a line naming it and why no order."""
    live = tmp_path / "live" / "www"
    deploy(live, T0 - timedelta(days=85), 90)  # 5 of 90 days left: past the emergency point
    cfg = config(tmp_path, live)
    db = FakeDatabase()
    health = StoreHealth("host=db", "web1", FakeClock(T0), connect=db, config=lambda: cfg)
    db.up = False
    health.probe()
    lines = health.lines()
    assert len(lines) == 2 and lines[1].startswith("www: past its emergency point")
    assert "never orders alone" in lines[1]


def test_emergency_while_down_is_logged_once_per_serial(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """store_down_at_emergency is logged once per serial however many probes fail; each flip rewrites metrics."""
    live = tmp_path / "live" / "www"
    deploy(live, T0 - timedelta(days=85), 90)
    cfg = config(tmp_path, live)
    clock, db, flips = FakeClock(T0), FakeDatabase(), []
    health = StoreHealth("host=db", "web1", clock, connect=db, config=lambda: cfg, on_change=lambda: flips.append(1))
    db.up = False
    for _ in range(30):
        health.probe()
        clock.advance(5)
    assert sum("store_down_at_emergency" in r.getMessage() for r in caplog.records) == 1
    db.up = True
    health.probe()
    assert flips == [1, 1]
