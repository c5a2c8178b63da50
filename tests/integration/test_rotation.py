"""The rotation pipeline end to end: the real certd CLI, real Pebble with real validation, real
nginx and HAProxy. Every test ends by asking a TLS client what the servers actually serve."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd.core.model import CertInfo, split_pem_chain
from tests.support.certd_env import CertdEnv
from tests.support.server_fixtures import served_fingerprint, served_leaf

SNI = "www.example.test"
DOMAINS = ["www.example.test", "example.test"]


class Site:
    """certd managing 'www' for one nginx and one HAProxy, both verified."""

    def __init__(self, env: CertdEnv, nginx: Any, haproxy: Any) -> None:
        self.env, self.nginx, self.haproxy = env, nginx, haproxy
        self.live = env.dir / "live" / "www"
        self.combined = env.dir / "haproxy" / "www.pem"

    def cert(self, reload: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
        default_reload = [{"hook": "nginx", "config": str(self.nginx.config)},
                          {"hook": "haproxy", "socket": str(self.haproxy.socket), "crt": self.haproxy.crt}]
        return self.env.http_cert(
            "www", DOMAINS, keep_versions=3, verify_timeout="3s",
            deploy={"live_dir": str(self.live), "combined": str(self.combined)},
            reload=default_reload if reload is None else reload,
            verify=[{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)},
                    {"endpoint": f"127.0.0.1:{self.haproxy.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)}],
            **kw)

    def configure(self, **kw: Any) -> None:
        self.env.write_config([self.cert(**kw)])

    def served(self) -> tuple[str, str]:
        return served_fingerprint(self.nginx.port, SNI), served_fingerprint(self.haproxy.port, SNI)

    def stored(self) -> dict[str, Any]:
        return self.env.status("www")["www"]


@pytest.fixture
def site(tmp_path: Path, pebble: Any, nginx_factory: Any, haproxy_factory: Any) -> Site:
    """A first certificate issued by certd, then nginx and HAProxy started on it."""
    env = CertdEnv(tmp_path, pebble)
    env.refresh_root()
    live, combined = tmp_path / "live" / "www", tmp_path / "haproxy" / "www.pem"
    combined.parent.mkdir()
    env.write_config([env.http_cert("www", DOMAINS, deploy={"live_dir": str(live), "combined": str(combined)})])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    haproxy = haproxy_factory(combined)
    s = Site(env, nginx, haproxy)
    s.configure()
    return s


def assert_served_valid(site: Site, fingerprint: str) -> None:
    """Both servers serve ``fingerprint``, a currently valid leaf for the site's names."""
    assert site.served() == (fingerprint, fingerprint)
    leaf = served_leaf(site.nginx.port, SNI)
    info = CertInfo.from_cert(leaf)
    assert set(info.domains) == set(DOMAINS)
    assert info.not_before <= info.not_after


def assert_disk_consistent(site: Site) -> None:
    """What a server would read from disk now: cert and key of one version, in every target."""
    for cert_pem, key_pem in [((site.live / "fullchain.pem").read_bytes(), (site.live / "privkey.pem").read_bytes()),
                              (site.combined.read_bytes(), site.combined.read_bytes())]:
        cert = x509.load_pem_x509_certificate(split_pem_chain(cert_pem)[0])
        key = serialization.load_pem_private_key(key_pem, None)
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_renewal_changes_what_nginx_and_haproxy_serve(site: Site) -> None:
    """A forced renewal issues, deploys, reloads both servers and commits once both serve it."""
    before = site.stored()
    assert site.served() == (before["fingerprint_sha256"],) * 2
    r = site.env.run("renew", "www", "--force", "--reason", "test rotation", check=0)
    assert "renewed: version 2" in r.stdout
    after = site.stored()
    assert after["version"] == 2 and after["last_result"] == "success"
    assert after["serial"] != before["serial"]
    assert_served_valid(site, after["fingerprint_sha256"])
    assert_disk_consistent(site)
    assert os.readlink(site.live).endswith("0002")
    assert site.env.run("verify", "www", check=0).stdout.startswith("www: OK")


def test_status_json_lists_contract_fields_and_chain_verifies_with_openssl(site: Site) -> None:
    """status --json carries the contract's fields, and the stored chain verifies against Pebble's root."""
    row = site.stored()
    for field in ("name", "domains", "version", "serial", "not_before", "not_after", "fingerprint_sha256",
                  "key_type", "next_renewal", "last_result"):
        assert field in row
    assert row["serial"] == row["serial"].lower() and ":" not in row["serial"]
    assert row["not_after"].endswith("Z") and row["key_type"] == "ecdsa-p256"
    r = subprocess.run(["openssl", "verify", "-CAfile", str(site.env.root_path), "-untrusted",
                        str(site.live / "chain.pem"), str(site.live / "cert.pem")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reload_hook_failure_rolls_back_to_the_old_certificate(site: Site, tmp_path: Path) -> None:
    """A hook exiting 1 after the switch: certd switches back and the old certificate is served again."""
    fail = tmp_path / "fail-hook"
    fail.write_text("#!/bin/sh\necho 'load balancer said no' >&2\nexit 1\n")
    fail.chmod(0o755)
    before = site.stored()
    site.configure(reload=site.cert()["reload"] + [{"command": [str(fail)]}])
    r = site.env.run("renew", "www", "--force", check=1)
    assert "rolled back to version 1" in r.stdout and "load balancer said no" in r.stdout
    after = site.stored()
    assert after["version"] == 1 and after["last_result"] == "rolled_back"
    assert_served_valid(site, before["fingerprint_sha256"])
    assert_disk_consistent(site)


def test_hook_hanging_past_its_timeout_rolls_back(site: Site, tmp_path: Path) -> None:
    """A hook that hangs is killed at its timeout and the rotation rolls back."""
    hang = tmp_path / "hang-hook"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    before = site.stored()
    site.configure(reload=site.cert()["reload"] + [{"command": [str(hang)], "timeout": "1s"}])
    r = site.env.run("renew", "www", "--force", check=1, timeout=60)
    assert "rolled back" in r.stdout and "timed out" in r.stdout
    assert_served_valid(site, before["fingerprint_sha256"])


def test_nginx_never_reloaded_is_caught_by_the_handshake(site: Site) -> None:
    """If nginx is never told to reload, verification sees the old certificate and certd rolls back."""
    before = site.stored()
    site.configure(reload=[{"command": ["/bin/true"]},
                           {"hook": "haproxy", "socket": str(site.haproxy.socket), "crt": site.haproxy.crt}])
    r = site.env.run("renew", "www", "--force", check=1)
    assert "rolled back" in r.stdout and "served serial" in r.stdout
    assert f"127.0.0.1:{site.nginx.port}" in r.stdout
    assert_served_valid(site, before["fingerprint_sha256"])
    assert site.stored()["version"] == 1


def test_haproxy_refusing_the_update_rolls_back(site: Site) -> None:
    """HAProxy's runtime API refusing the new certificate fails the rotation; both serve the old one."""
    before = site.stored()
    site.configure(reload=[{"hook": "nginx", "config": str(site.nginx.config)},
                           {"hook": "haproxy", "socket": str(site.haproxy.socket), "crt": "/no/such/crt.pem"}])
    r = site.env.run("renew", "www", "--force", check=1)
    assert "rolled back" in r.stdout and "haproxy" in r.stdout.lower()
    assert_served_valid(site, before["fingerprint_sha256"])


def test_rollback_command_serves_the_previous_version(site: Site) -> None:
    """certd rollback switches, reloads and verifies the previous version."""
    v1 = site.stored()
    site.env.run("renew", "www", "--force", check=0)
    v2 = site.stored()
    assert_served_valid(site, v2["fingerprint_sha256"])
    r = site.env.run("rollback", "www", "--reason", "bad chain reported", check=0)
    assert "rolled back to version 1" in r.stdout
    assert site.stored()["version"] == 1
    assert_served_valid(site, v1["fingerprint_sha256"])
    r = site.env.run("rollback", "www", "--to", "2", check=0)
    assert_served_valid(site, v2["fingerprint_sha256"])


def test_rollback_to_a_missing_version_is_a_usage_error(site: Site) -> None:
    """Asking for a version that is not stored: exit 2, one line, nothing changes."""
    before = site.stored()
    r = site.env.run("rollback", "www", "--to", "9", check=2)
    assert "no version 9" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert_served_valid(site, before["fingerprint_sha256"])


def test_verify_reports_what_is_served_when_it_differs(site: Site, tmp_path: Path) -> None:
    """certd verify exits 1 and names the served serial when an endpoint serves something else."""
    site.env.run("renew", "www", "--force", check=0)
    # Point nginx back at version 1 behind certd's back.
    target = site.live.parent / os.readlink(site.live)
    old = target.parent / "0001"
    tmp_link = site.live.parent / "www.tmp"
    os.symlink(old, tmp_link)
    os.replace(tmp_link, site.live)
    site.nginx.reload()
    v1_serial = json.loads(site.env.run("status", "--json", check=0).stdout)["certificates"][0]["serial"]
    r = site.env.run("verify", "www", check=1)
    assert "served serial" in r.stdout and v1_serial != ""


@pytest.mark.parametrize("step", ["issued", "staged", "switched", "reloaded", "verified", "committed"])
def test_sigkill_at_each_step_then_restart_is_consistent(site: Site, step: str) -> None:
    """Killed at any journal step, the next run finishes the rotation: served, valid, matching,
    unlocked, and the renewal audited exactly once (killed right after the commit, before its
    'renewed' record, the renewal had gone unrecorded)."""
    r = site.env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": step})
    assert r.returncode == -9, r.stderr
    assert_disk_consistent(site)
    site.nginx.port and served_leaf(site.nginx.port, SNI)  # still serving something
    r = site.env.run("renew", "www", check=0)  # not forced: only finishes the interrupted rotation
    row = site.stored()
    assert row["rotation"] is None and row["version"] == 2, row
    assert_served_valid(site, row["fingerprint_sha256"])
    assert_disk_consistent(site)
    audit = [json.loads(x) for x in (site.env.state_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["version"] for r in audit if r["event"] == "renewed"] == [1, 2], audit  # 1: the site fixture
    site.env.run("renew", "www", "--force", check=0)  # no stale lock, the next rotation works
    assert site.stored()["version"] == 3


def test_sigkill_during_rollback_then_restart_finishes_the_rollback(site: Site, tmp_path: Path) -> None:
    """Killed while rolling back, the next run completes the rollback and the old certificate is served."""
    before = site.stored()
    fail = tmp_path / "fail-hook"
    fail.write_text("#!/bin/sh\nexit 1\n")
    fail.chmod(0o755)
    site.configure(reload=site.cert()["reload"] + [{"command": [str(fail)]}])
    r = site.env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": "rolling_back"})
    assert r.returncode == -9
    assert_disk_consistent(site)
    site.configure()
    site.env.run("renew", "www")
    row = site.stored()
    assert row["rotation"] is None and row["version"] == 1
    assert_served_valid(site, before["fingerprint_sha256"])


def test_ca_down_gives_a_clear_error_and_leaves_everything_as_it_was(tmp_path: Path, pebble_factory: Any) -> None:
    """With the CA unreachable, renew exits 1 with one clear line; store and live files are untouched."""
    peb = pebble_factory()
    env = CertdEnv(tmp_path, peb)
    live = tmp_path / "live" / "www"
    env.write_config([env.http_cert("www", DOMAINS, deploy={"live_dir": str(live)})])
    env.run("renew", "--all", check=0)
    before = env.status()["www"]
    snapshot = {p: p.read_bytes() for p in sorted((tmp_path / "state").rglob("*.pem"))}
    peb.stop()
    r = env.run("renew", "www", "--force", check=1)
    assert "not reachable" in r.stdout and "Traceback" not in r.stdout + r.stderr
    after = env.status()["www"]
    assert (after["version"], after["serial"]) == (before["version"], before["serial"])
    assert after["last_result"] == "failed" and after["failures"] == 1
    assert {p: p.read_bytes() for p in sorted((tmp_path / "state").rglob("*.pem"))} == snapshot
    assert os.readlink(live).endswith("0001")


def test_one_failing_certificate_does_not_stop_the_others(tmp_path: Path, pebble: Any) -> None:
    """renew --all reports each certificate; a failure in one still lets the next renew (exit 1)."""
    env = CertdEnv(tmp_path, pebble)
    env.write_config([
        env.dns_cert("broken", ["broken.example.test"], dns01_hook=["/bin/false"]),
        env.http_cert("fine", ["fine.example.test"]),
    ])
    r = env.run("renew", "--all", check=1)
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert "renewed" in lines["fine"] and "renewed" not in lines["broken"]
    status = env.status()
    assert status["fine"]["version"] == 1 and status["broken"]["version"] is None


def test_nginx_reading_cert_and_key_from_one_combined_file_rotates_and_restarts_cleanly(
        tmp_path: Path, pebble: Any, nginx_factory: Any) -> None:
    """The README's advice for an nginx that others may restart: ssl_certificate and
    ssl_certificate_key both on the combined file (one open, one version) rotate and reload, and
    a restart after the switch serves the new certificate."""
    env = CertdEnv(tmp_path, pebble)
    env.refresh_root()
    combined = tmp_path / "nginx" / "www.pem"
    combined.parent.mkdir()
    env.write_config([env.http_cert("www", DOMAINS, deploy={"combined": str(combined)})])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(combined, combined, server_name=SNI)
    env.write_config([env.http_cert(
        "www", DOMAINS, deploy={"combined": str(combined)},
        reload=[{"hook": "nginx", "config": str(nginx.config)}],
        verify=[{"endpoint": f"127.0.0.1:{nginx.port}", "sni": SNI, "ca_bundle": str(env.root_path)}])])
    r = env.run("renew", "www", "--force", check=0)
    assert "renewed: version 2" in r.stdout
    row = env.status("www")["www"]
    assert served_fingerprint(nginx.port, SNI) == row["fingerprint_sha256"]
    nginx.kill()
    nginx.start()
    assert served_fingerprint(nginx.port, SNI) == row["fingerprint_sha256"]
