"""monitoring/: the Prometheus rules parse and name only metrics certd exports; the dashboard too."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import SystemClock
from certd.core.events import EventBus
from certd.daemon.storehealth import StoreHealth
from certd.engine.manager import Manager
from certd.ops.metrics import Metrics
from certd.store.files import FileStore
from tests.support.certs import make_bundle

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\bcertd_[a-z0-9_]+")


def exported(tmp_path: Path) -> set[str]:
    """Every sample name certd exports once a certificate is stored and each source was used."""
    cfg = Config(tmp_path / "c.toml", DaemonConfig(state_dir=tmp_path / "state"), AcmeConfig("https://127.0.0.1/dir"),
                 (CertificateConfig("www", ("www.example.test",)),))
    metrics, bus = Metrics(cfg), EventBus()
    bus.subscribe_measurements(metrics.on_measure)
    manager = Manager(cfg, store=FileStore(cfg.daemon.state_dir), events=bus)
    metrics.bind(manager)
    manager.store.set_current("www", manager.store.add_version(
        "www", make_bundle(("www.example.test",)), {"created": datetime.now(timezone.utc).isoformat()}))
    held = manager.load_state("www")  # held after a CA refusal: certd_renewal_blocked{reason="held"}
    held.failures, held.failure_kind = 1, "held"
    held.retry_after = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    manager.save_state("www", held)
    bus.measure("hook", 0.1, hook="nginx")
    StoreHealth("host=db", "web1", SystemClock()).register(metrics.registry)  # a [cluster] node's gauge
    metrics.set_drift("www", {})
    text = metrics.exposition().decode()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert "certd_last_success_timestamp_seconds" not in names  # no success recorded: no made-up value
    return names | {"certd_last_success_timestamp_seconds"}


def balanced(expr: str) -> bool:
    depth = 0
    for c in expr:
        depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def test_alert_rules_parse_and_use_only_exported_metrics(tmp_path):
    """Each rule has a name, a balanced expression over existing metrics, a severity and a summary."""
    rules = yaml.safe_load((ROOT / "monitoring" / "certd-alerts.yml").read_text())["groups"][0]["rules"]
    names = exported(tmp_path)
    assert len({r["alert"] for r in rules}) == len(rules) >= 6
    for rule in rules:
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= names, (rule["alert"], used - names)
        assert balanced(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
    covered = " ".join(r["expr"] for r in rules)
    for needed in ("certd_certificate_expiration_timestamp_seconds", "certd_renewals_total",
                   "certd_rollbacks_total", "certd_drift", "certd_renewal_blocked", "certd_store_up"):
        assert needed in covered  # expiring, renewals failing, a rollback, drift


def test_dashboard_is_valid_json_over_exported_metrics(tmp_path):
    """The Grafana dashboard parses; every panel queries metrics certd exports; ids are unique."""
    dash = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    names = exported(tmp_path)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 6
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used = set(METRIC.findall(t["expr"]))
            assert used and used <= names, (panel["title"], used - names)
            assert balanced(t["expr"])
