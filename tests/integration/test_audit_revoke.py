"""Revocation, the audit trail and retention end to end: the real certd CLI and daemon, real Pebble
(asked through its management API whether a serial is revoked), a real nginx (asked by a TLS
client what it serves), and the audit log as an operator reads and verifies it."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

import pytest
from cryptography.hazmat.primitives import serialization

from certd.core.clock import SystemClock
from certd.config import AcmeConfig
from certd.acme.issuer import connect
from certd.core.model import CertInfo
from certd.store.files import FileStore
from tests.support.certd_env import ROOT, CertdEnv
from tests.support.procs import ManagedProcess, wait_until
from tests.support.server_fixtures import served_leaf

SNI = "www.example.test"


class Site:
    """certd managing 'www' for one nginx (live_dir), plus a combined PEM and a plain key file."""

    def __init__(self, env: CertdEnv, nginx: Any) -> None:
        self.env, self.nginx = env, nginx
        self.deploy_dir = env.dir / "deploy"
        self.store = FileStore(env.state_dir)

    def cert(self, **kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = dict(
            keep_versions=5, verify_timeout="10s",  # generous: other suites may load the machine
            deploy={"live_dir": str(self.deploy_dir / "live" / "www"),
                    "combined": str(self.deploy_dir / "combined" / "www.pem"),
                    "files": [{"path": str(self.deploy_dir / "files" / "www.key"), "content": "privkey"}]},
            reload=[{"hook": "nginx", "config": str(self.nginx.config)}],
            verify=[{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(self.env.root_path)}])
        base.update(kw)
        return self.env.http_cert("www", [SNI], **base)

    def configure(self, **kw: Any) -> None:
        self.env.write_config([self.cert(**kw)])

    def served(self) -> CertInfo:
        return CertInfo.from_cert(served_leaf(self.nginx.port, SNI))

    def row(self) -> dict[str, Any]:
        return self.env.status("www")["www"]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.env.state_dir / "audit.jsonl").read_text().splitlines()]


@pytest.fixture
def site(tmp_path: Path, pebble: Any, nginx_factory: Any, certd_env: Any) -> Site:
    """A first certificate issued by certd (reuse_key, so later versions share its key), nginx on it."""
    env = certd_env(pebble)
    env.refresh_root()
    live = tmp_path / "deploy" / "live" / "www"
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(live)})])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    s = Site(env, nginx)
    s.configure(reuse_key=True)
    return s


def key_secrets(key_pem: bytes) -> list[bytes]:
    """What would betray a key: its DER, its whole base64 body, and each base64 line of it."""
    body = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    return [base64.b64decode(b"".join(body)), b"".join(body), *body]


def files_under(*roots: Path) -> Iterable[Path]:
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                if not p.is_symlink() and p.is_file():  # not a daemon's control socket
                    yield p


def holders(secrets: list[bytes], roots: Iterable[Path]) -> list[Path]:
    return [p for p in files_under(*roots) if any(s in p.read_bytes() for s in secrets)]


def test_revoke_key_compromise_revokes_rekeys_rotates_and_destroys_the_key(site: Site, pebble: Any) -> None:
    """keyCompromise: Pebble reports every certificate with that key Revoked, nginx serves a new
    key, and the old key's bytes exist nowhere under the state or deploy directories."""
    site.env.run("renew", "www", "--force", check=0)   # version 2, same key (reuse_key)
    v1, v2 = site.store.load("www", 1), site.store.load("www", 2)
    assert v1.bundle.key_pem == v2.bundle.key_pem
    old_key = v2.bundle.key_pem
    old_pub = serialization.load_pem_private_key(old_key, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert holders(key_secrets(old_key), [site.env.state_dir, site.deploy_dir])  # the check can see it

    r = site.env.run("revoke", "www", "--reason", "keyCompromise", check=0)
    assert "revoked serial" in r.stdout and "renewed: version 3" in r.stdout and "destroyed" in r.stdout

    for sv in (v1, v2):
        status = pebble.cert_status(sv.bundle.info.serial)
        assert status["Status"] == "Revoked" and status["Reason"] == 1, status
    served = served_leaf(site.nginx.port, SNI)
    assert served.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo) != old_pub
    assert CertInfo.from_cert(served).serial == site.row()["serial"] and site.row()["version"] == 3
    assert holders(key_secrets(old_key), [site.env.state_dir, site.deploy_dir]) == []
    assert all(site.store.load("www", v).meta.get("key_destroyed") for v in (1, 2))
    kinds = [(r["event"], r["initiator"]) for r in site.audit()]
    assert ("revoked", "uid=0(root)") in kinds and ("key_destroyed", "uid=0(root)") in kinds
    destroyed = next(r for r in site.audit() if r["event"] == "key_destroyed")
    assert destroyed["detail"]["versions"] == [1, 2] and destroyed["version"] == 2 and destroyed["detail"]["deployed_copies"] >= 2
    r = site.env.run("rollback", "www", "--to", "2", check=2)
    assert "compromised key" in r.stderr
    assert "chain intact" in site.env.run("audit", "verify", check=0).stdout


def test_key_compromise_whose_rotation_fails_keeps_the_served_key_until_the_next_renewal(
        site: Site, pebble: Any, tmp_path: Path) -> None:
    """If the re-key rotation rolls back, revoke exits 1 and the still-served key is kept; the next
    successful renewal (with a fresh key) destroys it."""
    old = site.store.load("www", 1).bundle
    fail = tmp_path / "fail-hook"
    fail.write_text("#!/bin/sh\nexit 1\n")
    fail.chmod(0o755)
    site.configure(reload=site.cert()["reload"] + [{"command": [str(fail)]}])
    r = site.env.run("revoke", "www", "--reason", "keyCompromise", check=1)
    assert "rolled back" in r.stdout and "still kept" in r.stdout
    failed = next(x for x in site.audit() if x["event"] == "renewal_failed")
    assert failed["initiator"] == "uid=0(root)" and failed["outcome"] == "rolled_back"
    assert pebble.cert_status(old.info.serial)["Status"] == "Revoked"
    assert site.served().serial == old.info.serial  # served (revoked) rather than nothing
    assert (site.deploy_dir / "live" / "www" / "privkey.pem").read_bytes() == old.key_pem
    site.configure(reuse_key=True)
    site.env.run("renew", "www", "--force", check=0)
    assert site.served().spki_sha256 != old.info.spki_sha256
    assert holders(key_secrets(old.key_pem), [site.env.state_dir, site.deploy_dir]) == []
    assert [r["event"] for r in site.audit()].count("key_destroyed") == 1


def test_revoke_superseded_renews_first_then_revokes_the_old_certificate(site: Site, pebble: Any) -> None:
    """superseded: the replacement is served before the old serial is revoked; the old one cannot be rolled back to."""
    old = site.row()
    r = site.env.run("revoke", "www", "--reason", "superseded", check=0)
    assert "renewed: version 2" in r.stdout and f"revoked the old serial {old['serial']}" in r.stdout
    status = pebble.cert_status(old["serial"])
    assert status["Status"] == "Revoked" and status["Reason"] == 4, status
    assert site.served().serial == site.row()["serial"] != old["serial"]
    assert "was revoked (superseded)" in site.env.run("rollback", "www", check=2).stderr


def test_revoke_cessation_revokes_only_and_the_schedule_holds_off(site: Site, pebble: Any) -> None:
    """cessationOfOperation: revoked, not renewed, and a plain renew leaves it alone (ARI says renew now)."""
    old = site.row()
    r = site.env.run("revoke", "www", "--reason", "cessationofoperation", check=0)
    assert "not renewed" in r.stdout
    assert pebble.cert_status(old["serial"])["Status"] == "Revoked"
    r = site.env.run("renew", "www", check=0)
    assert "not renewing" in r.stdout and site.row()["version"] == 1
    row = site.row()
    assert row["renewal_reason"].startswith("revoked (cessationOfOperation)")
    assert row["state"] == "revoked" and row["next_renewal"] is None


def test_revoke_usage_errors_exit_2(site: Site) -> None:
    """An unknown reason, a missing reason or an unknown name: exit 2, one line, nothing revoked."""
    for args, says in ((["revoke", "www", "--reason", "lostTheKey"], "unknown revocation reason"),
                       (["revoke", "www"], "--reason"),
                       (["revoke", "nope", "--reason", "superseded"], "unknown certificate nope")):
        r = site.env.run(*args, check=2)
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(r["event"] == "revoked" for r in site.audit())


def test_operator_actions_through_the_daemon_are_audited_with_uid_and_reason(site: Site, pebble: Any) -> None:
    """Via the control socket, a forced renewal, a rollback and a revocation record uid=0(root) and the reason."""
    site.env.start_daemon()
    site.env.run("renew", "www", "--force", "--wait", "--reason", "incident 4711", check=0)
    site.env.run("rollback", "www", "--reason", "bad OCSP staple", check=0)
    r = site.env.run("revoke", "www", "--reason", "superseded", check=0)
    assert "revoked the old serial" in r.stdout
    records = json.loads(site.env.run("history", "www", "--json", check=0).stdout)["records"]
    forced = [x for x in records if x["event"] == "forced"]
    assert forced[0]["initiator"] == "uid=0(root)" and forced[0]["reason"] == "incident 4711"
    rb = next(x for x in records if x["event"] == "operator_rollback")
    assert rb["initiator"] == "uid=0(root)" and rb["reason"] == "bad OCSP staple"
    revoked = next(x for x in records if x["event"] == "revoked")
    assert revoked["initiator"] == "uid=0(root)" and revoked["reason"] == "superseded"
    assert {x["initiator"] for x in records if x["event"] == "issued"} >= {"uid=0(root)"}
    table = site.env.run("history", "www", check=0).stdout.splitlines()
    assert table[0].split() == ["TIME", "EVENT", "NAME", "INITIATOR", "OUTCOME", "SERIALS", "REASON"]
    assert any("incident 4711" in line and "forced" in line for line in table)


def test_renewal_after_a_revocation_by_someone_else_is_initiated_by_ari(site: Site, pebble: Any) -> None:
    """A certificate revoked behind certd's back is renewed by the daemon, and the audit names ARI as initiator."""
    version = site.env.renew_until_ari_finds("www")
    old = site.store.load("www", version).bundle
    issuer = connect(AcmeConfig(pebble.directory_url, ca_bundle=pebble.ca_bundle), site.store, SystemClock())
    issuer.revoke(old.cert_pem, 4)
    issuer.close()
    site.env.start_daemon()
    wait_until(lambda: site.row()["version"] == version + 1, timeout=40, what="renewal after revocation")
    renewed = next(r for r in site.audit() if r["event"] == "renewed" and r["version"] == version + 1)
    assert renewed["initiator"] == "ari" and "ARI window ended" in renewed["reason"]
    assert site.served().serial == site.row()["serial"]


def test_the_daemons_own_renewals_are_audited_as_scheduler(tmp_path: Path, pebble: Any, certd_env: Any) -> None:
    """The daemon's own issuance is recorded with initiator 'scheduler', and never as verified without endpoints."""
    env = certd_env(pebble)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")})])
    env.start_daemon()  # nothing issued yet: due at once
    wait_until(lambda: env.status("www")["www"]["version"] == 1, timeout=30, what="first issuance")
    records = json.loads(env.run("history", "--json", check=0).stdout)["records"]
    assert [(r["event"], r["initiator"]) for r in records if r["event"] in ("issued", "renewed")] == \
        [("issued", "scheduler"), ("renewed", "scheduler")]
    kinds = [r["event"] for r in records]
    assert "deployed" in kinds and "verified" not in kinds  # no verify endpoints: nothing was checked
    assert stat.S_IMODE((env.state_dir / "audit.jsonl").stat().st_mode) == 0o600
    assert "records, chain intact" in env.run("audit", "verify", check=0).stdout


def test_untouched_audit_log_verifies_and_each_tampering_is_named(site: Site) -> None:
    """audit verify exits 0 on the untouched log; edit, delete, insert, swap and truncate each exit 1 naming the line."""
    site.env.run("renew", "www", "--force", "--reason", "one", check=0)
    site.env.run("renew", "www", "--force", "--reason", "two", check=0)
    path = site.env.state_dir / "audit.jsonl"
    pristine = path.read_bytes()
    lines = pristine.splitlines(keepends=True)
    n = len(lines)
    r = site.env.run("audit", "verify", check=0)
    assert f"{n} records, chain intact" in r.stdout

    edited = lines.copy()
    edited[4] = edited[4].replace(b'"name": "www"', b'"name": "api"')
    forged = json.loads(lines[5])
    forged.update(reason="nothing to see", hash="0" * 64)
    tampered = {
        "edit": (b"".join(edited), "audit.jsonl line 5: hash mismatch (record edited?)"),
        "delete": (b"".join(lines[:6] + lines[7:]), "audit.jsonl line 7: prev does not match line 6 "
                                                     "(record removed, inserted or reordered)"),
        "insert": (b"".join(lines[:6] + [json.dumps(forged).encode() + b"\n"] + lines[6:]), "audit.jsonl line 7:"),
        "swap": (b"".join(lines[:3] + [lines[4], lines[3]] + lines[5:]), "audit.jsonl line 4: prev does not match line 3"),
        "truncate": (pristine[:-25], f"audit.jsonl line {n}: incomplete last record (file truncated?)"),
        "drop last": (b"".join(lines[:-1]), f"audit.head: records seq {n} but audit.jsonl ends at seq {n - 1}"),
    }
    for how, (data, expected) in tampered.items():
        path.write_bytes(data)
        r = site.env.run("audit", "verify")
        assert r.returncode == 1, (how, r.stdout, r.stderr)
        assert expected in r.stdout, (how, r.stdout)
        assert "TAMPERED" in r.stdout.splitlines()[-1]
    path.write_bytes(pristine)
    site.env.run("audit", "verify", check=0)
    path.write_bytes(tampered["edit"][0])
    assert "hash chain is broken" in site.env.run("history", check=0).stderr


def test_pruned_versions_are_audited_and_their_keys_gone(site: Site) -> None:
    """keep_versions = 2: each pruned version is recorded (version_pruned) and its files are removed."""
    site.configure(keep_versions=2)  # and a fresh key per version
    site.env.run("renew", "www", "--force", check=0)
    v1_key = site.store.load("www", 1).bundle.key_pem
    for _ in range(2):
        site.env.run("renew", "www", "--force", check=0)
    assert site.store.versions("www") == [3, 4]
    pruned = [r for r in site.audit() if r["event"] == "version_pruned"]
    assert [r["version"] for r in pruned] == [1, 2]
    assert all(r["reason"] == "keep_versions = 2" and r["name"] == "www" and r["initiator"] == "uid=0(root)"
               for r in pruned)
    assert pruned[0]["old_serial"] == next(r["new_serial"] for r in site.audit() if r["event"] == "issued")
    assert not (site.deploy_dir / "live" / ".www.versions" / "0001").exists()
    assert holders(key_secrets(v1_key), [site.env.state_dir, site.deploy_dir]) == []
    site.env.run("audit", "verify", check=0)


def test_no_log_audit_record_or_error_ever_holds_private_key_material(site: Site, tmp_path: Path) -> None:
    """After renew, rollback, a failing hook and a keyCompromise revocation (CLI and daemon, --debug),
    no output, log line, audit record or stored error holds a PEM key marker or any key's bytes."""
    secrets: set[bytes] = set()

    def collect_keys() -> None:
        for p in site.env.state_dir.rglob("privkey.pem"):
            secrets.update(key_secrets(p.read_bytes()))

    site.configure()  # a fresh key per version
    outputs: list[str] = []

    def run(*args: str, check: int | None = None) -> None:
        r = site.env.run("--debug", *args, check=check)
        outputs.extend([r.stdout, r.stderr])
        collect_keys()

    collect_keys()
    run("renew", "www", "--force", "--reason", "cli", check=0)
    run("rollback", "www", check=0)
    fail = tmp_path / "fail-hook"
    fail.write_text("#!/bin/sh\ncat \"$CERTD_LIVE_DIR/privkey.pem\" >&2\nexit 1\n")  # a hostile hook
    fail.chmod(0o755)
    site.configure(reload=[{"hook": "nginx", "config": str(site.nginx.config)}, {"command": [str(fail)]}])
    run("renew", "www", "--force", check=1)
    site.configure()
    daemon = ManagedProcess(site.env.argv("--debug", "run"), log_path=tmp_path / "daemon-debug.log", cwd=ROOT)
    site.env.daemons.append(daemon.start())
    wait_until(lambda: site.env.socket.exists(), timeout=30, what="control socket")
    run("renew", "www", "--force", "--wait", check=0)
    run("rollback", "www", check=0)
    run("revoke", "www", "--reason", "keyCompromise", check=0)
    run("revoke", "www", "--reason", "notAReason", check=2)
    daemon.stop(timeout=30)
    texts = {"daemon log": daemon.log_text(), "cli output": "\n".join(outputs),
             "audit": (site.env.state_dir / "audit.jsonl").read_text(),
             "status": site.env.run("status", "--json", check=0).stdout,
             "history": site.env.run("history", "--json", check=0).stdout}
    assert len(secrets) > 20
    for what, text in texts.items():
        assert "PRIVATE KEY" not in text, what
        data = text.encode()
        assert not [s for s in secrets if s in data], what
