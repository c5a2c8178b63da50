"""``certd import certbot`` against a lineage and an account made by real certbot (PyPI,
installed once into ``.cache/certbot-venv-<version>``) on the session's Pebble: the current
certificate becomes version 1, certd renews it with certbot's account, and certbot's live/
paths keep being served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certd.core.model import split_pem_chain

from tests.support.certd_env import ROOT, CertdEnv, key_matches

CERTBOT_VERSION = "5.8.0"
VENV = ROOT / ".cache" / f"certbot-venv-{CERTBOT_VERSION}"
NAME = "imp.example.test"


@pytest.fixture(scope="session")
def certbot() -> Path:
    """certbot from PyPI in its own venv, installed once and kept (like bench/bench.py)."""
    exe = VENV / "bin" / "certbot"
    if exe.exists():
        try:  # a venv moved or built elsewhere names an interpreter that is gone: build it again
            subprocess.run([str(exe), "--version"], check=True, capture_output=True, timeout=60)
            return exe
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
            shutil.rmtree(VENV, ignore_errors=True)
    try:  # a venv's scripts name their interpreter by absolute path: built where it stays
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"certbot=={CERTBOT_VERSION}"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(VENV, ignore_errors=True)
        if os.environ.get("CI"):  # CI installs the project from PyPI too: certbot must come as well
            pytest.fail(f"certbot {CERTBOT_VERSION} could not be installed from PyPI: {e}", pytrace=False)
        pytest.skip(f"certbot {CERTBOT_VERSION} could not be installed from PyPI: {e}")
    return exe


def serial_of(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(split_pem_chain(pem)[0]).serial_number, "x")


def certbot_lineage(certbot: Path, pebble: Any, le: Path) -> None:
    """One lineage by `certbot certonly --standalone` with a plain and a shell hook."""
    dirs = ["--config-dir", str(le), "--work-dir", str(le.parent / "cb-work"), "--logs-dir", str(le.parent / "cb-logs")]
    subprocess.run([str(certbot), "certonly", "--standalone", "-d", NAME, "--server", pebble.directory_url,
                    "--http-01-port", str(pebble.http_port), "--http-01-address", "127.0.0.1", "--key-type", "ecdsa",
                    "--deploy-hook", "/usr/bin/true", "--post-hook", "echo renewed | cat", "--non-interactive",
                    "--agree-tos", "-m", "ops@example.test", *dirs],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
                   env={**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)})


def stored_account(state_dir: Path) -> dict[str, Any]:
    (registration,) = list((state_dir / "accounts").glob("*/account.json")) or pytest.fail("no stored account")
    return dict(json.loads(registration.read_text()))


def test_a_certbot_lineage_is_imported_as_version_1_and_renewed_with_certbots_account(
        tmp_path: Path, pebble: Any, certbot: Path) -> None:
    """import certbot --write keeps certbot's certificate as version 1 and its account; a forced renewal
    then uses that account (ARI replaces accepted) and lands in certbot's old live/ files."""
    le = tmp_path / "letsencrypt"
    certbot_lineage(certbot, pebble, le)
    live = le / "live" / NAME
    certbot_serial = serial_of((live / "cert.pem").read_bytes())
    (regr,) = le.glob("accounts/*/*/*/regr.json")
    certbot_uri = json.loads(regr.read_text())["uri"]
    env = CertdEnv(tmp_path, pebble)
    before = env.write_config([]).read_text()

    review = env.run("import", "certbot", str(le), check=0)
    assert f'name = "{NAME}"' in review.stdout and '[[certificate.reload]]\ncommand = ["/usr/bin/true"]' in review.stdout
    assert "post_hook = 'echo renewed | cat' needs a shell" in review.stderr
    assert not (env.state_dir / "certs").exists(), "without --write nothing is imported"
    assert env.config_path.read_text() == before and (live / "cert.pem").is_symlink()

    done = env.run("import", "certbot", str(le), "--write", check=0)
    assert "steps left" in done.stdout and "certbot.timer" in done.stdout
    row = env.status(NAME)[NAME]
    assert (row["version"], row["serial"]) == (1, certbot_serial)
    assert stored_account(env.state_dir)["uri"] == certbot_uri

    env.run("renew", "--force", NAME, check=0)
    row = env.status(NAME)[NAME]
    assert row["version"] == 2 and row["serial"] != certbot_serial
    assert stored_account(env.state_dir)["uri"] == certbot_uri, "certd registered a new account"
    meta = json.loads((env.state_dir / "certs" / NAME / "versions" / "0002" / "meta.json").read_text())
    assert meta["replaces"], "the order did not name the imported certificate (ARI replaces, same account only)"
    for f in ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"):
        assert (live / f).is_file() and not (live / f).is_symlink(), f"{f} still certbot's symlink"
    assert serial_of((live / "fullchain.pem").read_bytes()) == row["serial"]
    assert key_matches(live / "cert.pem", live / "privkey.pem")
