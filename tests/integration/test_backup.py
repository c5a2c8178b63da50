"""Sealed offline backups end to end: the real CLI, real Pebble, real nginx. A state dir sealed
under one KEK is exported to an age recipient, restored on "another machine" (another config,
another KEK, an empty state dir), and a rollback there is served by nginx with the right key."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pyrage
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd.core.model import split_pem_chain

from tests.support.certd_env import CertdEnv, key_matches
from tests.support.procs import wait_until
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"


def plain_keys_in(directory: Path) -> list[Path]:
    """Every file under ``directory`` holding a PEM private key (what `grep -r "PRIVATE KEY"` finds)."""
    return [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink() and b"PRIVATE KEY" in p.read_bytes()]


def served_leaf_of(live: Path) -> str:
    """Hex SHA-256 of the leaf in ``live``/fullchain.pem (what nginx would serve from it)."""
    leaf = x509.load_pem_x509_certificate(split_pem_chain((live / "fullchain.pem").read_bytes())[0])
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


def tree(directory: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under ``directory``."""
    out: dict[str, bytes | str] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            out[str(p)] = os.readlink(p)
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


class Host:
    """One machine's certd: its own config, state dir, KEK and live_dir, managing 'www'."""

    def __init__(self, workdir: Path, pebble: Any, recipient: str) -> None:
        workdir.mkdir()
        self.env = CertdEnv(workdir, pebble)
        self.env.refresh_root()
        self.live = workdir / "live" / "www"
        self.kek = workdir / "kek"
        self.recipient = recipient
        self.configure()
        self.env.run("kek", "init", check=0)

    def configure(self, nginx: Any = None) -> None:
        """[keys] with this host's KEK and the backup recipient; nginx's reload and verify when given."""
        self.env.tables = {"keys": {"kek_file": str(self.kek), "backup_recipient": self.recipient}}
        verify = [{"endpoint": f"127.0.0.1:{nginx.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)}] \
            if nginx else []
        reload = [{"hook": "nginx", "config": str(nginx.config)}] if nginx else []
        self.env.write_config([self.env.http_cert("www", [SNI], keep_versions=5, verify_timeout="5s",
                                                  deploy={"live_dir": str(self.live)}, reload=reload, verify=verify)])

    def kek_line(self) -> str:
        """``certd status``'s line naming the KEK the keys are sealed under."""
        return next(line for line in self.env.run("status", check=0).stdout.splitlines()
                    if line.startswith("keys: sealed under KEK file:"))

    def serves(self, nginx: Any, fingerprint: str) -> None:
        """nginx serves ``fingerprint``, and live_dir's key is that certificate's."""
        assert served_fingerprint(nginx.port, SNI) == fingerprint
        assert key_matches(self.live / "fullchain.pem", self.live / "privkey.pem")


@pytest.fixture
def age_identity(tmp_path: Path) -> tuple[Path, str]:
    """An age identity file (0600, as age-keygen writes it) kept "offline", and its recipient."""
    identity = pyrage.x25519.Identity.generate()
    path = tmp_path / "backup-identity.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# public key: {identity.to_public()}\n{identity}\n")
    return path, str(identity.to_public())


def test_restore_on_another_machine_then_rollback_behind_nginx(tmp_path: Path, pebble: Any, nginx_factory: Any,
                                                               age_identity: tuple[Path, str]) -> None:
    """Three versions sealed under KEK A are exported (0600, no readable key), restored under KEK B
    into an empty state dir with their numbers and fingerprints; the daemon deploys the restored
    version, nginx serves it, and a rollback there is served with the matching key."""
    identity, recipient = age_identity
    a = Host(tmp_path / "a", pebble, recipient)
    a.env.run("renew", "--force", "www", "--reason", "first", check=0)
    nginx_a = nginx_factory(a.live / "fullchain.pem", a.live / "privkey.pem", server_name=SNI)
    a.configure(nginx_a)
    for _ in range(2):
        a.env.run("renew", "--force", "www", "--reason", "renew", check=0)
    v3 = a.env.status("www")["www"]
    assert v3["version"] == 3
    a.serves(nginx_a, v3["fingerprint_sha256"])
    assert plain_keys_in(a.env.state_dir) == []

    archive = tmp_path / "offsite" / "certd-backup.age"
    archive.parent.mkdir()
    r = a.env.run("backup", "export", str(archive), check=0)
    assert "exported 1 certificate (3 versions) and 1 ACME account to" in r.stdout
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in archive.read_bytes() and b"BEGIN CERTIFICATE" not in archive.read_bytes()
    assert "backup_exported" in a.env.run("history", check=0).stdout

    b = Host(tmp_path / "b", pebble, recipient)  # another machine: another config, another KEK
    assert b.kek.read_bytes() != a.kek.read_bytes()
    r = b.env.run("backup", "restore", str(archive), "--identity", str(identity), check=0)
    assert "restored 1 certificate (3 versions" in r.stdout and "keys sealed under KEK file:" in r.stdout
    assert plain_keys_in(b.env.state_dir) == []
    assert b.kek_line() != a.kek_line()  # every key re-sealed under b's own KEK
    row = b.env.status("www")["www"]
    assert (row["version"], row["fingerprint_sha256"], row["serial"]) == \
        (3, v3["fingerprint_sha256"], v3["serial"])
    assert "backup_restored" in b.env.run("history", check=0).stdout

    # Nothing is deployed on b yet: the daemon's first drift check (repair_drift on) redeploys
    # the desired version into b's own live_dir, as docs/KEYS.md's restore procedure says.
    b.env.daemon_extra = {"repair_drift": True}
    b.configure()
    daemon = b.env.start_daemon()
    wait_until(lambda: (b.live / "fullchain.pem").exists() and served_leaf_of(b.live) == v3["fingerprint_sha256"],
               timeout=60, what="the daemon to redeploy the restored version")
    daemon.stop(timeout=30)
    nginx_b = nginx_factory(b.live / "fullchain.pem", b.live / "privkey.pem", server_name=SNI)
    b.serves(nginx_b, v3["fingerprint_sha256"])
    # Then a rollback behind nginx: reload, verifying handshake, version 2's key served.
    b.configure(nginx_b)
    b.env.run("rollback", "www", "--reason", "restored from backup", check=0)
    v2 = b.env.status("www")["www"]
    assert v2["version"] == 2 and v2["fingerprint_sha256"] != v3["fingerprint_sha256"]
    b.serves(nginx_b, v2["fingerprint_sha256"])
    assert plain_keys_in(b.env.state_dir) == []


def test_restore_into_a_state_dir_that_is_not_empty_is_refused(tmp_path: Path, pebble: Any,
                                                               age_identity: tuple[Path, str]) -> None:
    """A restore over a state dir that already holds certificates exits 2 with one line and leaves
    every file there as it was."""
    identity, recipient = age_identity
    a = Host(tmp_path / "a", pebble, recipient)
    a.env.run("renew", "--force", "www", "--reason", "first", check=0)
    archive = tmp_path / "b.age"
    a.env.run("backup", "export", str(archive), check=0)
    before = tree(a.env.state_dir)
    r = a.env.run("backup", "restore", str(archive), "--identity", str(identity), check=2)
    assert r.stderr.count("\n") == 1 and "is not empty" in r.stderr
    assert tree(a.env.state_dir) == before
