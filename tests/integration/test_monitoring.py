"""Monitoring end to end: Prometheus metrics scraped from a running daemon, the node_exporter
textfile, webhook alerts received by a real local HTTP server, and drift — found by `certd drift`,
noticed by the daemon through watchdog, and repaired so nginx serves the stored certificate."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from certd.store.files import FileStore
from tests.support.certd_env import CertdEnv
from tests.support.procs import free_port, wait_until
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"


# --- helpers ------------------------------------------------------------------------------------


class Webhook:
    """A real HTTP server on 127.0.0.1 recording every POST (headers and JSON body)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.posts.append({"path": self.path, "headers": dict(self.headers), "raw": body,
                                   "json": json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/certd-hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.posts if p["json"]["kind"] == kind]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and index every sample by (name, sorted labels)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return samples(text)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /,
          **labels: str) -> float | None:
    return metrics.get((metric, tuple(sorted(labels.items()))))


def site(env: CertdEnv, tmp_path: Path, nginx_factory: Any, **cert_kw: Any) -> tuple[Any, dict[str, Any], Path]:
    """'www' issued by certd into live_dir, then nginx serving it, reloaded and verified by certd."""
    env.refresh_root()
    live = tmp_path / "live" / "www"
    base = env.http_cert("www", [SNI], deploy={"live_dir": str(live)})
    env.write_config([base])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    cert = {**base, "verify_timeout": "3s", **cert_kw,
            "reload": [{"hook": "nginx", "config": str(nginx.config)}, *cert_kw.get("reload", [])],
            "verify": [{"endpoint": f"127.0.0.1:{nginx.port}", "ca_bundle": str(env.root_path)}]}
    env.write_config([cert])
    return nginx, cert, live


def failing_hook(tmp_path: Path) -> Path:
    hook = tmp_path / "fail-hook"
    hook.write_text("#!/bin/sh\necho 'load balancer said no' >&2\nexit 1\n")
    hook.chmod(0o755)
    return hook


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_endpoint_reports_stored_expiry_and_counts_a_renewal(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """Scraped from the running daemon: each certificate's expiry equals the stored not_after, a
    forced renewal is counted and moves the gauges, and the textfile carries the same."""
    env = certd_env(pebble)
    port = free_port()
    textfile = tmp_path / "node_exporter" / "certd.prom"
    textfile.parent.mkdir()
    env.daemon_extra.update(metrics_listen=f"127.0.0.1:{port}", metrics_textfile=str(textfile))
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live-www")}),
                      env.http_cert("api", ["api.example.test"], deploy={"live_dir": str(tmp_path / "live-api")})])
    env.run("renew", "--all", check=0)
    store = FileStore(env.state_dir)
    env.start_daemon()
    m = wait_until(lambda: scrape(port), timeout=10, what="metrics endpoint", ignore=(httpx.HTTPError,))
    for name in ("www", "api"):
        info = store.load(name, 1).bundle.info
        assert value(m, "certd_certificate_expiration_timestamp_seconds", name=name) == info.not_after.timestamp()
        assert value(m, "certd_certificate_not_before_timestamp_seconds", name=name) == info.not_before.timestamp()
        assert value(m, "certd_certificate_version", name=name) == 1
        assert value(m, "certd_certificate_next_renewal_timestamp_seconds", name=name) > time.time()
        assert value(m, "certd_renewals_total", name=name, result="success") == 0
    assert any(k[0] == "certd_build_info" for k in m)

    env.run("renew", "www", "--force", "--wait", check=0)
    m = scrape(port)
    v2 = store.load("www", 2).bundle.info
    assert value(m, "certd_renewals_total", name="www", result="success") == 1
    assert value(m, "certd_renewals_total", name="api", result="success") == 0
    assert value(m, "certd_certificate_version", name="www") == 2
    assert value(m, "certd_certificate_expiration_timestamp_seconds", name="www") == v2.not_after.timestamp()
    assert value(m, "certd_last_success_timestamp_seconds", name="www") >= time.time() - 60
    assert value(m, "certd_acme_request_duration_seconds_count") >= 5  # an order is several requests

    def textfile_has_renewal() -> bool:
        try:
            t = samples(textfile.read_text())
        except FileNotFoundError:
            return False
        return value(t, "certd_renewals_total", name="www", result="success") == 1
    wait_until(textfile_has_renewal, timeout=10, what="textfile rewritten after the renewal")
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert not [p for p in textfile.parent.iterdir() if p != textfile]  # no temporary files left


# --- alerts -------------------------------------------------------------------------------------


def test_webhook_gets_a_rollback_and_a_failed_renewal_with_the_bearer_token(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any, webhook: Webhook) -> None:
    """A rolled-back rotation and a failed renewal each reach the webhook once, authenticated,
    with name, serials, error, severity and host, and no key material."""
    env = certd_env(pebble)
    env.alerts = {"webhook_url": webhook.url, "bearer_token": "s3cret-token", "timeout": "5s"}
    nginx, cert, _live = site(env, tmp_path, nginx_factory)
    before = env.status("www")["www"]
    env.write_config([{**cert, "reload": cert["reload"] + [{"command": [str(failing_hook(tmp_path))]}]},
                      env.dns_cert("broken", ["broken.example.test"], dns01_hook=["/bin/false"])])
    r = env.run("renew", "www", "--force", check=1)
    assert "rolled back to version 1" in r.stdout
    env.run("renew", "broken", check=1)

    wait_until(lambda: webhook.of_kind("rolled_back") and webhook.of_kind("renewal_failed"), timeout=10,
               what="both notifications")
    (rolled,) = webhook.of_kind("rolled_back")
    (failed,) = webhook.of_kind("renewal_failed")  # the rolled-back renewal is not notified twice
    for post in (rolled, failed):
        assert post["headers"]["Authorization"] == "Bearer s3cret-token"
        assert post["headers"]["Content-Type"] == "application/json"
        assert post["path"] == "/certd-hook"
        assert b"PRIVATE KEY" not in post["raw"] and b"s3cret" not in post["raw"]
        assert post["json"]["host"] == socket.gethostname() and post["json"]["time"].endswith("Z")
    body = rolled["json"]
    assert body["name"] == "www" and body["severity"] == "warning"
    assert body["new_serial"] == before["serial"]            # served again after the rollback
    assert body["old_serial"] and body["old_serial"] != before["serial"]
    assert "load balancer said no" in body["error"]
    body = failed["json"]
    assert body["name"] == "broken" and body["outcome"] == "failed" and body["error"]
    assert served_fingerprint(nginx.port, SNI) == before["fingerprint_sha256"]


def test_a_webhook_that_never_answers_does_not_delay_the_rotation(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any) -> None:
    """With the webhook black-holed (accepts, never answers, 8 s timeout) a rolled-back rotation
    through the daemon finishes while the first delivery attempt still hangs; it is retried later."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)  # listens, never accepts
    try:
        env = certd_env(pebble)
        env.alerts = {"webhook_url": f"http://127.0.0.1:{hole.getsockname()[1]}/hook", "timeout": "8s"}
        _nginx, cert, _live = site(env, tmp_path, nginx_factory)
        env.write_config([{**cert, "reload": cert["reload"] + [{"command": [str(failing_hook(tmp_path))]}]}])
        daemon = env.start_daemon()
        started = time.monotonic()
        r = env.run("renew", "www", "--force", "--wait", check=1)
        elapsed = time.monotonic() - started
        assert "rolled back to version 1" in r.stdout
        assert "alert_retry" not in daemon.log_text(), f"the rotation waited for the webhook ({elapsed:.1f}s)"
        assert elapsed < 8
        wait_until(lambda: "alert_retry" in daemon.log_text(), timeout=15, what="the alert retried in the background")
    finally:
        hole.close()


# --- drift --------------------------------------------------------------------------------------


def edit_one_byte(path: Path) -> None:
    """Change one base64 character in place (same inode), as a careless editor would."""
    data = bytearray(path.read_bytes())
    i = data.index(b"\n", len(data) // 2) - 5
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    with open(path, "r+b") as f:
        f.write(data)


def test_edited_deployed_files_are_found_by_certd_drift_and_repaired_by_the_daemon(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any) -> None:
    """A byte changed in live_dir's fullchain.pem and a chmod of the key: `certd drift` exits 1 naming
    both; the daemon (repair_drift) redeploys, nginx serves the stored certificate, drift exits 0."""
    env = certd_env(pebble)
    nginx, cert, live = site(env, tmp_path, nginx_factory)
    stored = env.status("www")["www"]
    assert env.run("drift", check=0).stdout.startswith("www: OK: no drift")
    edit_one_byte(live / "fullchain.pem")
    (live / "privkey.pem").chmod(0o644)

    r = env.run("drift", check=1)
    assert f"www: deployed {live}/fullchain.pem: content differs from the stored version" in r.stdout
    assert f"www: deployed {live}/privkey.pem: mode 0644, expected 0600" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 2, r.stdout
    report = json.loads(env.run("drift", "--json", check=1).stdout)
    assert report["drift"] is True
    (row,) = report["certificates"]
    assert {m["kind"] for m in row["mismatches"]} == {"deployed"} and row["serial"] == stored["serial"]
    assert set(row) == {"name", "configured", "version", "serial", "clean", "note", "mismatches"}

    env.write_config([{**cert, "deploy": {**cert["deploy"], "repair_drift": True}}])
    daemon = env.start_daemon()
    wait_until(lambda: env.run("drift").returncode == 0, timeout=20, what="drift repaired")
    # the files are whole again a moment before the daemon's own re-check logs the repair
    wait_until(lambda: "drift_repaired" in daemon.log_text(), timeout=20, what="drift_repaired logged")
    assert stat.S_IMODE((live / "privkey.pem").stat().st_mode) == 0o600
    store = FileStore(env.state_dir)
    assert (live / "fullchain.pem").read_bytes() == store.load("www", 1).bundle.fullchain_pem
    assert served_fingerprint(nginx.port, SNI) == stored["fingerprint_sha256"]


def test_daemon_notices_a_switched_link_at_once_and_nginx_serves_the_current_version_again(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any) -> None:
    """live_dir pointed back at version 1 and nginx reloaded behind certd's back: with a 1 h drift
    interval the daemon still notices within seconds (watchdog) and puts version 2 back in service."""
    env = certd_env(pebble)
    env.daemon_extra.update(drift_interval="1h", repair_drift=True)
    nginx, _cert, live = site(env, tmp_path, nginx_factory)
    env.run("renew", "www", "--force", check=0)
    v2 = env.status("www")["www"]
    daemon = env.start_daemon()
    wait_until(lambda: "drift_checked names=www" in daemon.log_text(), timeout=20, what="the first drift check")

    tmp_link = live.parent / "www.tmp"
    os.symlink(".www.versions/0001", tmp_link)
    os.replace(tmp_link, live)
    nginx.reload()
    wait_until(lambda: "drift_repaired" in daemon.log_text(), timeout=10, what="drift noticed and repaired")
    log = daemon.log_text()
    assert "points at '.www.versions/0001'" in log and "serves serial" in log
    assert served_fingerprint(nginx.port, SNI) == v2["fingerprint_sha256"]
    assert os.readlink(live).endswith("0002")
    assert env.run("drift", check=0).stdout.startswith("www: OK")


def test_without_repair_the_daemon_reports_drift_by_gauge_and_webhook(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any, webhook: Webhook) -> None:
    """repair_drift off: a chmod of the deployed key is noticed promptly, set in certd_drift, sent
    to the webhook once, and left for the operator."""
    env = certd_env(pebble)
    port = free_port()
    env.daemon_extra.update(drift_interval="1h", metrics_listen=f"127.0.0.1:{port}")
    env.alerts = {"webhook_url": webhook.url}
    _nginx, _cert, live = site(env, tmp_path, nginx_factory)
    daemon = env.start_daemon()
    wait_until(lambda: "drift_checked names=www" in daemon.log_text(), timeout=20, what="the first drift check")
    assert value(scrape(port), "certd_drift", name="www", kind="deployed") == 0

    (live / "privkey.pem").chmod(0o640)
    wait_until(lambda: webhook.of_kind("drift_found"), timeout=10, what="drift_found notification")
    body = webhook.of_kind("drift_found")[0]["json"]
    assert body["summary"] == f"www: deployed {live}/privkey.pem: mode 0640, expected 0600"
    assert value(scrape(port), "certd_drift", name="www", kind="deployed") == 1
    assert stat.S_IMODE((live / "privkey.pem").stat().st_mode) == 0o640  # not repaired
    r = env.run("drift", check=1)
    assert "mode 0640, expected 0600" in r.stdout
    assert len(webhook.of_kind("drift_found")) == 1  # the same drift is not notified again
