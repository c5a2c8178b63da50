"""A CA that answers with something certd must not deploy (tests/support/hostile_ca.py: a proxy
in front of real Pebble rewriting the certificate download). For every bad answer certd refuses
before anything is stored or deployed, says why in one line (exit 1), and nginx keeps serving
the current certificate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from certd.store.files import FileStore
from tests.support.certd_env import ROOT, CertdEnv, key_matches
from tests.support.hostile_ca import OVERSIZED_BYTES, HostileCA
from tests.support.procs import wait_until
from tests.support.prober import Target, TrustAnchors, verified_leaf

SNI = "www.example.test"
DOMAINS = [SNI, "example.test"]


class Site:
    """certd, through the hostile proxy, managing 'www' for an nginx it reloads and verifies."""

    def __init__(self, env: CertdEnv, ca: HostileCA, nginx: Any, live: Path) -> None:
        self.env, self.ca, self.nginx, self.live = env, ca, nginx, live
        self.anchors = TrustAnchors(env.root_path)

    def served(self) -> Any:
        return verified_leaf(Target("127.0.0.1", self.nginx.port, SNI), self.anchors)

    def versions(self) -> list[int]:
        return FileStore(self.env.state_dir).versions("www")

    def state_files(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.env.state_dir)): p.read_bytes()
                for p in sorted(self.env.state_dir.rglob("*")) if p.is_file()
                and p.name.endswith(".pem") and "accounts" not in p.parts}


def make_site(tmp_path: Path, pebble: Any, nginx_factory: Any, **cert_extra: Any) -> Site:
    """A first certificate issued through the proxy (passing through), served by nginx."""
    ca = HostileCA(pebble, tmp_path).start()
    env = CertdEnv(tmp_path, pebble)
    env.refresh_root()
    env.acme_extra["directory"] = ca.directory_url
    live = tmp_path / "live" / "www"
    base = env.http_cert("www", DOMAINS, deploy={"live_dir": str(live)}, **cert_extra)
    env.write_config([base])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    env.write_config([{**base, "reload": [{"hook": "nginx", "config": str(nginx.config)}],
                       "verify": [{"endpoint": f"127.0.0.1:{nginx.port}", "ca_bundle": str(env.root_path)}]}])
    return Site(env, ca, nginx, live)


@pytest.fixture
def site(tmp_path: Path, pebble: Any, nginx_factory: Any) -> Any:
    """make_site on the shared Pebble; the proxy and any daemon are stopped afterwards."""
    s = make_site(tmp_path, pebble, nginx_factory)
    yield s
    s.env.close()
    s.ca.stop()


REFUSALS = [
    ("other_key", "the leaf is for another public key"),
    ("other_names", "SANs [evil.example.test] differ from requested [example.test, www.example.test]"),
    ("expired", "already expired"),
    ("not_yet_valid", "check the clocks"),
    ("garbage_pem", "is not valid PEM/DER"),
    ("not_pem", "the CA sent no PEM certificate"),
    ("empty", "the CA sent an empty chain"),
    ("truncated", "truncated PEM certificate"),
    ("unlinked_chain", "is not issued by certificate 2"),
    ("oversized", "larger than"),
    ("oversized_declared", "larger than"),
]


@pytest.mark.parametrize("mode,why", REFUSALS, ids=[m for m, _ in REFUSALS])
def test_bad_certificate_from_the_ca_is_refused_before_anything_is_stored(site: Site, mode: str, why: str) -> None:
    """A bad download: renew exits 1 with one line saying why; no new version, nginx serves the old leaf."""
    before = site.served()
    stored_before = site.state_files()
    site.ca.mode = mode
    r = site.env.run("renew", "www", "--force", check=1)
    assert site.ca.forged == 1
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("www: "), out
    assert why in lines[0], lines[0]
    assert "not stored" in lines[0] or "not read" in lines[0], lines[0]
    assert site.versions() == [1]
    assert site.state_files() == stored_before
    assert not list((site.env.state_dir / "certs" / "www" / "versions").glob(".*"))
    row = site.env.status("www")["www"]
    assert row["version"] == 1 and row["last_result"] == "failed" and why in row["last_error"]
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")
    # The CA behaves again: the next renewal goes through.
    site.ca.mode = None
    site.env.run("renew", "www", "--force", check=0)
    assert site.served().fingerprint_sha256 == site.env.status("www")["www"]["fingerprint_sha256"] != before.fingerprint_sha256


def test_oversized_answer_is_not_read_into_memory(site: Site) -> None:
    """A 50 MB certificate download: certd stops reading early; its memory stays far below 50 MB extra."""
    def max_rss_kib(*args: str) -> int:
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        r = subprocess.run([sys.executable, "-c", code, *site.env.argv(*args)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, check=True)
        return int(r.stdout.strip())

    normal = max_rss_kib("renew", "www", "--force")
    site.ca.mode = "oversized"
    hostile = max_rss_kib("renew", "www", "--force")
    assert site.versions() == [1, 2]
    assert site.ca.oversized_sent < OVERSIZED_BYTES / 2, site.ca.oversized_sent
    assert hostile < normal + 20 * 1024, (normal, hostile)


def test_certificate_from_an_untrusted_ca_is_caught_by_the_handshake_and_rolled_back(site: Site) -> None:
    """A chain to an untrusted root passes the pre-store checks; the handshake check catches it and rolls back."""
    before = site.served()
    site.ca.mode = "untrusted"
    r = site.env.run("renew", "www", "--force", check=1)
    assert "rolled back to version 1" in r.stdout and "chain does not validate" in r.stdout, r.stdout
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    row = site.env.status("www")["www"]
    assert row["version"] == 1 and row["last_result"] == "rolled_back"
    assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")
    assert os.readlink(site.live).endswith("0001")


def test_daemon_keeps_serving_while_the_ca_misbehaves_and_recovers_after(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any) -> None:
    """certd run against a CA sending expired certificates refuses each, keeps nginx's, and renews once it is fixed."""
    # One-hour certificates due one second after issuance: the daemon works on them at once.
    site = make_site(tmp_path, pebble_factory(validity=3600), nginx_factory, renew_before="59m58s")
    site.ca.hide_ari = True  # Pebble 2.10's ARI window (the whole hour) would win over renew_before
    try:
        before = site.served()
        site.ca.mode = "expired"
        site.env.run("renew", "www", "--force", check=1)
        daemon = site.env.start_daemon()
        wait_until(lambda: site.ca.forged >= 2, timeout=30, what="the daemon's own attempt refused too")
        assert site.versions() == [1]
        assert site.served().fingerprint_sha256 == before.fingerprint_sha256
        assert site.env.status("www")["www"]["failures"] >= 2
        site.ca.mode = None
        wait_until(lambda: site.env.status("www")["www"]["last_result"] == "success", timeout=60,
                   what="a renewal once the CA is fixed")
        daemon.stop(timeout=30)
        row = site.env.status("www")["www"]
        assert row["version"] >= 2 and row["failures"] == 0
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"]
        assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")
    finally:
        site.env.close()
        site.ca.stop()
