"""Keys at rest under a key-encryption key ([keys]), end to end: the real CLI and daemon, real
Pebble, real nginx. What is checked is what an attacker holding a copy of the state directory
would find (no private key in it), and what a TLS client receives (the right key, at every step)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support.certd_env import CertdEnv, key_matches
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"


def plain_keys_in(directory: Path) -> list[Path]:
    """Every file under ``directory`` holding a PEM private key (what `grep -r "PRIVATE KEY"` finds)."""
    return [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink() and b"PRIVATE KEY" in p.read_bytes()]


def sealed_keks(state_dir: Path) -> dict[str, int]:
    """KEK id -> how many sealed keys name it."""
    counts: dict[str, int] = {}
    for p in state_dir.rglob("*.sealed"):
        if p.name == "keys.sealed":
            continue
        kek = json.loads(p.read_bytes())["kek"]
        counts[kek] = counts.get(kek, 0) + 1
    return counts


class Site:
    """certd managing 'www' behind one nginx, with keys sealed under the KEK in ``kek``."""

    def __init__(self, tmp_path: Path, pebble: Any, nginx_factory: Any) -> None:
        self.env = CertdEnv(tmp_path, pebble)
        self.env.refresh_root()
        self.live = tmp_path / "live" / "www"
        self.kek = tmp_path / "keys" / "kek"
        self.kek.parent.mkdir(mode=0o700)
        self.nginx_factory = nginx_factory
        self.nginx: Any = None

    def configure(self, keys: dict[str, Any] | None) -> None:
        self.env.tables = {"keys": keys} if keys is not None else {}
        verify = [{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)}] \
            if self.nginx else []
        reload = [{"hook": "nginx", "config": str(self.nginx.config)}] if self.nginx else []
        self.env.write_config([self.env.http_cert("www", [SNI], keep_versions=4, verify_timeout="5s",
                                                  deploy={"live_dir": str(self.live)}, reload=reload, verify=verify)])

    def start_nginx(self) -> None:
        self.nginx = self.nginx_factory(self.live / "fullchain.pem", self.live / "privkey.pem", server_name=SNI)

    def renew(self) -> None:
        self.env.run("renew", "--force", "--wait", "www", "--reason", "test", check=0)  # --wait: the daemon's answer is the outcome

    def serves_current(self) -> str:
        """nginx serves the stored current version, and live_dir's key matches its certificate."""
        row = self.env.status("www")["www"]
        assert served_fingerprint(self.nginx.port, SNI) == row["fingerprint_sha256"]
        assert key_matches(self.live / "fullchain.pem", self.live / "privkey.pem")
        return str(row["fingerprint_sha256"])

    def deployed_versions(self) -> list[int]:
        root = self.live.parent / ".www.versions"
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


@pytest.fixture
def site(tmp_path: Path, pebble: Any, nginx_factory: Any) -> Site:
    return Site(tmp_path, pebble, nginx_factory)


def test_kek_init_makes_a_private_32_byte_file_and_refuses_to_overwrite(site: Site) -> None:
    """`certd kek init` creates the KEK 0600 from the first byte and never overwrites one."""
    site.configure({"kek_file": str(site.kek)})
    r = site.env.run("kek", "init", check=0)
    assert "created KEK file:" in r.stdout
    st = site.kek.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32
    before = site.kek.read_bytes()
    again = site.env.run("kek", "init", check=2)
    assert "already exists" in again.stderr and site.kek.read_bytes() == before
    site.kek.chmod(0o644)
    bad = site.env.run("check-config", check=2)
    assert "accessible to other users" in bad.stderr and "chmod 600" in bad.stderr


def test_sealed_state_dir_holds_no_private_key_and_deploy_keeps_two(site: Site) -> None:
    """With [keys], after several rotations the state dir holds no plain key, live_dir keeps the
    current and previous version only, and a rollback serves the previous key again."""
    site.configure({"kek_file": str(site.kek)})
    site.env.run("kek", "init", check=0)
    site.renew()
    site.start_nginx()
    site.configure({"kek_file": str(site.kek)})
    for _ in range(3):
        site.renew()
    current = site.serves_current()
    assert plain_keys_in(site.env.state_dir) == []
    ring_id = next(iter(sealed_keks(site.env.state_dir)))
    assert sealed_keks(site.env.state_dir) == {ring_id: 5}  # 4 versions + the ACME account key
    assert site.deployed_versions() == [3, 4]
    assert "keys: sealed under KEK " + ring_id in site.env.run("status", check=0).stdout
    site.env.run("rollback", "www", "--reason", "test", check=0)
    assert site.serves_current() != current
    assert site.env.status("www")["www"]["version"] == 3


def test_adding_keys_seals_an_existing_state_dir(site: Site) -> None:
    """Adding [keys] to a state dir with plain keys seals every one (audited), nothing plain is
    left, and the certificate keeps renewing and serving."""
    site.configure(None)
    site.renew()
    site.start_nginx()
    site.configure(None)
    site.renew()
    assert "keys: stored unencrypted" in site.env.run("status", check=0).stdout
    assert len(plain_keys_in(site.env.state_dir)) == 3  # two versions + the account key
    site.env.run("kek", "init", "--file", str(site.kek), check=0)
    site.configure({"kek_file": str(site.kek)})
    site.env.run("status", check=0)
    assert plain_keys_in(site.env.state_dir) == []
    assert sum(sealed_keks(site.env.state_dir).values()) == 3
    history = json.loads(site.env.run("history", "--json", check=0).stdout)["records"]
    sealed = [r for r in history if r["event"] == "keys_sealed"]
    assert len(sealed) == 1 and "3" in json.dumps(sealed[0])
    site.renew()
    site.serves_current()
    assert plain_keys_in(site.env.state_dir) == []
    site.configure(None)  # [keys] dropped again: a clear error, nothing served changes
    r = site.env.run("renew", "--force", "www", check=1)
    assert "sealed under KEK" in (r.stdout + r.stderr) and "[keys]" in (r.stdout + r.stderr)
    site.serves_current()


def test_kek_rotation_through_the_daemon_rewraps_every_key(site: Site) -> None:
    """`certd kek rotate --new` re-wraps every key under the new KEK through the running daemon,
    which keeps renewing; afterwards the old KEK can go and a rollback still works."""
    site.configure({"kek_file": str(site.kek)})
    site.env.run("kek", "init", check=0)
    site.renew()
    site.start_nginx()
    site.configure({"kek_file": str(site.kek)})
    site.renew()
    old_id = next(iter(sealed_keks(site.env.state_dir)))
    new_kek = site.kek.with_name("kek-2")
    site.env.run("kek", "init", "--file", str(new_kek), check=0)
    daemon = site.env.start_daemon()
    r = site.env.run("kek", "rotate", "--new", str(new_kek), check=0)
    assert "re-wrapped 3 keys" in r.stdout and f'kek_file = "{new_kek}"' in r.stdout
    counts = sealed_keks(site.env.state_dir)
    assert old_id not in counts and sum(counts.values()) == 3
    new_id = next(iter(counts))
    site.renew()  # the daemon, still configured with the old KEK, seals under the new one
    assert sealed_keks(site.env.state_dir) == {new_id: 4}
    assert "kek_rotated" in site.env.run("history", check=0).stdout
    daemon.stop(timeout=30)
    site.configure({"kek_file": str(new_kek), "old_kek_files": [str(site.kek)]})
    os.unlink(site.kek)  # destroyed after the rotation: no key needs it
    site.env.run("rollback", "www", "--reason", "after the KEK rotation", check=0)
    site.serves_current()
    assert plain_keys_in(site.env.state_dir) == []
    assert "rotation" not in site.env.run("status", check=0).stdout


def test_a_wrong_kek_is_refused_and_the_served_key_stays(site: Site) -> None:
    """A KEK file replaced by another one: renewals fail with the KEK's name and the fix, and
    nginx keeps serving the current (matching) key."""
    site.configure({"kek_file": str(site.kek)})
    site.env.run("kek", "init", check=0)
    site.renew()
    site.start_nginx()
    site.configure({"kek_file": str(site.kek)})
    served = site.serves_current()
    site.kek.unlink()
    site.env.run("kek", "init", check=0)  # a new KEK under the old name
    r = site.env.run("renew", "--force", "www", check=1)
    assert "sealed under KEK file:" in r.stderr + r.stdout and "old_kek_files" in r.stderr + r.stdout
    assert served_fingerprint(site.nginx.port, SNI) == served
    assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")
