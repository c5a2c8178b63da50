"""Key classes end to end: the real certd CLI, real Pebble with real http-01 validation, real
nginx. A class's max_key_age re-keys a valid certificate even with reuse_key (checked by the
public key nginx serves in a real handshake), and its destroy_after destroys a retired key
(file gone, ``key_destroyed`` with its SPKI hash in history) while rollback keeps working."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from certd.core.model import CertInfo
from tests.support.certd_env import CertdEnv
from tests.support.procs import wait_until
from tests.support.server_fixtures import served_fingerprint, served_leaf

SNI = "www.example.test"
MAX_KEY_AGE = 20  # seconds: the first forced renewal (~3 s after issuance) is well inside it


class Site:
    """certd managing 'www' (of the key class whose settings are ``key_class``) for one nginx."""

    def __init__(self, env: CertdEnv, key_class: dict[str, Any]) -> None:
        self.env = env
        env.arrays = {"key_class": [{"name": "critical", **key_class}]}
        self.live = env.dir / "live" / "www"
        self.nginx: Any = None

    def configure(self) -> None:
        verify = [{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)}] \
            if self.nginx is not None else []
        reload = [{"hook": "nginx", "config": str(self.nginx.config)}] if self.nginx is not None else []
        self.env.write_config([self.env.http_cert("www", [SNI], key_class="critical", verify_timeout="3s",
                                                  deploy={"live_dir": str(self.live)}, reload=reload, verify=verify)])

    def status(self) -> dict[str, Any]:
        return self.env.status("www")["www"]

    def served_spki(self) -> str:
        return CertInfo.from_cert(served_leaf(self.nginx.port, SNI)).spki_sha256

    def key_files(self, version: int) -> list[Path]:
        """The version's stored key: privkey.pem, or privkey.sealed under [keys]."""
        vdir = self.env.state_dir / "certs" / "www" / "versions" / f"{version:04d}"
        return [p for p in (vdir / "privkey.pem", vdir / "privkey.sealed") if p.exists()]

    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.env.run("history", "www", "--json", check=0).stdout)["records"]


def _site(tmp_path: Path, pebble: Any, nginx_factory: Any, key_class: dict[str, Any], sealed: bool = False) -> Site:
    """The first certificate issued by certd (keys sealed under a KEK if ``sealed``), then nginx
    started on it and wired in."""
    env = CertdEnv(tmp_path, pebble)
    env.refresh_root()
    site = Site(env, key_class)
    if sealed:
        kek = tmp_path / "keys" / "kek"
        kek.parent.mkdir(mode=0o700)
        env.tables = {"keys": {"kek_file": str(kek)}}
    site.configure()
    if sealed:
        env.run("kek", "init", check=0)
    env.run("renew", "--all", check=0)
    site.nginx = nginx_factory(site.live / "fullchain.pem", site.live / "privkey.pem", server_name=SNI)
    site.configure()
    return site


def test_max_key_age_gives_a_valid_certificate_a_new_key_despite_reuse_key(tmp_path: Path, pebble: Any,
                                                                           nginx_factory: Any) -> None:
    """reuse_key keeps the key while it is young; past max_key_age certd renews by itself with a new key."""
    site = _site(tmp_path, pebble, nginx_factory, {"reuse_key": True, "max_key_age": f"{MAX_KEY_AGE}s"})
    first = site.status()
    assert first["key_class"] == "critical" and isinstance(first["key_age_days"], float)
    assert first["renewal_reason"] == f"key older than max_key_age {MAX_KEY_AGE}s (key_class critical)"
    spki = site.served_spki()

    r = site.env.run("renew", "www", "--force", "--reason", "young key", check=0)
    assert "renewed: version 2" in r.stdout, r.stdout
    assert site.served_spki() == spki  # reuse_key: same key, new certificate
    assert served_fingerprint(site.nginx.port, SNI) == site.status()["fingerprint_sha256"] != \
        first["fingerprint_sha256"]

    # Not forced: `certd renew` renews only once the planner finds the key too old.
    wait_until(lambda: "renewed: version 3" in site.env.run("renew", "www").stdout,
               timeout=MAX_KEY_AGE + 60, interval=1.0, what="the renewal at max_key_age")
    now = site.status()
    assert now["version"] == 3 and now["key_class"] == "critical" and now["key_age_days"] == 0.0
    assert site.served_spki() != spki  # a new key, served
    assert served_fingerprint(site.nginx.port, SNI) == now["fingerprint_sha256"]
    reasons = [r["reason"] for r in site.history() if r["event"] == "renewed"]
    assert reasons[-1] == f"key older than max_key_age {MAX_KEY_AGE}s (key_class critical)"


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_destroy_after_destroys_a_retired_key_and_rollback_still_works(tmp_path: Path, pebble: Any,
                                                                      nginx_factory: Any, sealed: bool) -> None:
    """The retired version's key file (sealed: its only wrapped data key) and deployed copies go,
    history shows its SPKI, rollback to the previous version works."""
    site = _site(tmp_path, pebble, nginx_factory, {"destroy_after": "1s"}, sealed)
    key1 = (site.live / "privkey.pem").read_bytes()  # version 1's, as deployed
    spki1 = site.served_spki()
    assert site.key_files(1) and site.key_files(1)[0].name == ("privkey.sealed" if sealed else "privkey.pem")
    for version in (2, 3):
        r = site.env.run("renew", "www", "--force", check=0)
        assert f"renewed: version {version}" in r.stdout, r.stdout
    # v1 retired when v3 committed; any later pass past 1 s destroys it (`certd renew` runs one).
    wait_until(lambda: site.env.run("renew", "www", check=0) and not site.key_files(1),
               timeout=30, interval=0.5, what="version 1's key destroyed")
    assert site.key_files(2) and site.key_files(3)
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and key1 in p.read_bytes()]
    assert holders == []  # neither the store nor a deploy target keeps a copy
    [destroyed] = [r for r in site.history() if r["event"] == "key_destroyed"]
    assert (destroyed["version"], destroyed["spki_sha256"], destroyed["outcome"]) == (1, spki1, "success")
    assert destroyed["reason"] == "destroy_after 1s (key_class critical)"
    table = site.env.run("history", "www", check=0).stdout
    assert "key_destroyed" in table and f"spki_sha256:{spki1}" in table

    v2 = json.loads((site.env.state_dir / "certs" / "www" / "versions" / "0002" / "meta.json").read_text())
    r = site.env.run("rollback", "www", "--reason", "test", check=0)
    assert "rolled back to version 2" in r.stdout, r.stdout
    assert served_fingerprint(site.nginx.port, SNI) == v2["fingerprint_sha256"]
    r = site.env.run("rollback", "www", "--to", "1", check=2)
    assert "version 1's private key was destroyed" in r.stderr and r.stderr.count("\n") == 1

