"""Keys at rest sealed under a KEK on a real PKCS#11 token (SoftHSM2), end to end: real Pebble,
nginx serving what certd deploys, the certd CLI and daemon as processes.

The token's key never leaves it: ``certd kek init`` creates it there, every stored key's data key
is wrapped and unwrapped inside it, and a removed token stops certd with one clear line while
nginx goes on serving the last deployed (matching) certificate and key.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from certd.crypto.custody import is_sealed, sealed_kek
from tests.support.certd_env import CertdEnv, key_matches
from tests.support.procs import wait_until
from tests.support.server_fixtures import served_fingerprint
from tests.support.softhsm import SoftHsmToken

SNI = "www.example.test"
DOMAINS = ["www.example.test"]


def grep_private_keys(state_dir: Path) -> str:
    """``grep -r "PRIVATE KEY"`` over the state dir: what it prints (empty: nothing found)."""
    r = subprocess.run(["grep", "-rl", "PRIVATE KEY", str(state_dir)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout


def www_cert(env: CertdEnv, live: Path, nginx: Any | None = None) -> dict[str, Any]:
    """'www' deployed to ``live``; with ``nginx``, reloaded and verified there too."""
    served: dict[str, Any] = {} if nginx is None else {
        "reload": [{"hook": "nginx", "config": str(nginx.config)}],
        "verify": [{"endpoint": f"127.0.0.1:{nginx.port}", "sni": SNI, "ca_bundle": str(env.root_path)}]}
    return env.http_cert("www", DOMAINS, keep_versions=4, verify_timeout="3s", deploy={"live_dir": str(live)},
                         **served)


def sealed_keks(state_dir: Path) -> list[str | None]:
    """The KEK id each sealed key in the state dir names."""
    return [sealed_kek(p.read_bytes()) for p in sorted(state_dir.rglob("*.sealed")) if is_sealed(p.read_bytes())]


class TokenSite:
    """certd keeping 'www' for one nginx, its keys sealed under the token's KEK."""

    def __init__(self, env: CertdEnv, token: SoftHsmToken, nginx_factory: Callable[..., Any]) -> None:
        self.env, self.token = env, token
        self.live = env.dir / "live" / "www"
        env.extra_env.update(token.env)
        env.tables["keys"] = {"kek": token.uri, "pkcs11_module": str(token.module),
                              "pkcs11_pin_file": str(token.pin_file)}
        env.refresh_root()
        env.write_config([www_cert(env, self.live)])
        r = env.run("kek", "init", check=0)
        assert "on the token" in r.stdout and "never leaves it" in r.stdout
        self.kek_id = r.stdout.split("created KEK ", 1)[1].split()[0]
        env.run("renew", "--all", check=0)
        self.nginx = nginx_factory(self.live / "fullchain.pem", self.live / "privkey.pem", server_name=SNI)
        env.write_config([www_cert(env, self.live, self.nginx)])

    def stored(self) -> dict[str, Any]:
        return self.env.status("www")["www"]

    def served(self) -> str:
        return served_fingerprint(self.nginx.port, SNI)

    def assert_serving(self, version: int) -> None:
        """nginx serves the stored version ``version``, and the deployed key matches it."""
        row = self.stored()
        assert row["version"] == version, row
        assert self.served() == row["fingerprint_sha256"]
        assert key_matches(self.live / "fullchain.pem", self.live / "privkey.pem")


@pytest.fixture
def token_site(pebble: Any, certd_env: Callable[..., CertdEnv], softhsm: SoftHsmToken,
               nginx_factory: Callable[..., Any]) -> TokenSite:
    """A token KEK made by `certd kek init`, a first certificate sealed under it, nginx serving it."""
    return TokenSite(certd_env(pebble), softhsm, nginx_factory)


def test_issue_renew_roll_back_and_restart_with_the_kek_on_a_token(token_site: TokenSite) -> None:
    """Every stored key sealed under the token KEK; renew, rollback and a daemon restart all work."""
    site, env = token_site, token_site.env
    site.assert_serving(1)
    assert grep_private_keys(env.state_dir) == ""
    assert sealed_keks(env.state_dir) == [site.kek_id] * 2   # the version's key and the ACME account key
    assert f"keys: sealed under KEK {site.kek_id}" in env.run("status", check=0).stdout

    assert "renewed: version 2" in env.run("renew", "www", "--force", check=0).stdout
    site.assert_serving(2)
    assert "rolled back to version 1" in env.run("rollback", "www", check=0).stdout
    site.assert_serving(1)

    daemon = env.start_daemon()
    env.run("renew", "www", "--force", "--wait", check=0)
    site.assert_serving(3)
    daemon.stop(timeout=30)
    env.start_daemon()   # a new process: a new session on the token, the same KEK id
    env.run("rollback", "www", "--to", "2", check=0)
    site.assert_serving(2)
    assert grep_private_keys(env.state_dir) == ""


def test_a_removed_token_fails_renewals_in_one_line_and_nginx_keeps_serving(token_site: TokenSite) -> None:
    """Token pulled: `renew --force` fails naming it, through the daemon and without one, and nginx
    serves the old key; plugged back and certd restarted (SoftHSM2 lists tokens at start), it renews."""
    site, env = token_site, token_site.env
    daemon = env.start_daemon()
    # its first look at the certificate (an ARI poll) done, so what fails below is the forced renewal
    wait_until(lambda: "renewal_decision name=www" in daemon.log_text(), timeout=30, what="the daemon's ARI poll")
    before = site.stored()
    site.token.remove()
    r = env.run("renew", "www", "--force", "--wait", check=1)
    assert f"www: PKCS#11 token '{site.token.label}' is unavailable" in r.stdout, r.stdout + r.stderr
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    assert site.served() == before["fingerprint_sha256"]
    assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")

    daemon.stop(timeout=30)   # without a daemon, the CLI cannot load the KEK: an operation that failed (exit 1)
    r = env.run("renew", "www", "--force", check=1)
    assert r.stderr.startswith(f"certd: PKCS#11 token '{site.token.label}' is unavailable: not found in "), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert site.served() == before["fingerprint_sha256"]

    site.token.replug()
    env.start_daemon()
    site.assert_serving(before["version"])
    env.run("renew", "www", "--force", "--wait", check=0)
    site.assert_serving(before["version"] + 1)
    assert grep_private_keys(env.state_dir) == ""


def test_kek_rotation_from_a_kek_file_to_the_token(pebble: Any, certd_env: Callable[..., CertdEnv],
                                                  softhsm: SoftHsmToken, nginx_factory: Callable[..., Any],
                                                  tmp_path: Path) -> None:
    """Keys sealed under a KEK file move to the token with `certd kek rotate --new pkcs11:...`; once the
    file is destroyed, a rollback to the oldest version still opens its key (unwrapped inside the token)."""
    env = certd_env(pebble)
    kek_file = tmp_path / "file.kek"
    env.tables["keys"] = {"kek_file": str(kek_file)}
    live = env.dir / "live" / "www"
    env.refresh_root()
    env.write_config([www_cert(env, live)])
    file_id = env.run("kek", "init", check=0).stdout.split("created KEK ", 1)[1].split()[0]
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    env.write_config([www_cert(env, live, nginx)])
    env.run("renew", "www", "--force", check=0)
    assert env.status("www")["www"]["version"] == 2
    assert sealed_keks(env.state_dir) == [file_id] * 3   # two versions' keys and the account key

    # the token KEK becomes the current one; the file is still accepted for opening
    env.extra_env.update(softhsm.env)
    env.tables["keys"] = {"kek": softhsm.uri, "pkcs11_module": str(softhsm.module),
                          "pkcs11_pin_file": str(softhsm.pin_file), "old_kek_files": [str(kek_file)]}
    env.write_config()
    token_id = env.run("kek", "init", check=0).stdout.split("created KEK ", 1)[1].split()[0]
    r = env.run("kek", "rotate", "--new", softhsm.uri, check=0)
    assert f"under KEK {token_id}" in r.stdout, r.stdout + r.stderr
    assert sealed_keks(env.state_dir) == [token_id] * 3

    # the file destroyed and dropped: everything opens through the token alone
    kek_file.unlink()
    env.tables["keys"].pop("old_kek_files")
    env.write_config()
    env.run("renew", "www", "--force", check=0)
    env.run("rollback", "www", "--to", "1", check=0)
    row = env.status("www")["www"]
    assert row["version"] == 1 and served_fingerprint(nginx.port, SNI) == row["fingerprint_sha256"]
    assert key_matches(live / "fullchain.pem", live / "privkey.pem")
    assert grep_private_keys(env.state_dir) == ""
