"""Issue 12's filesystem attacks, run for real by the deploy directory's owner against certd.

The attacker (``attacker`` fixture: a throw-away system user, no capabilities) owns the deploy
directory, as ``www-data`` owns ``/etc/ssl/app``. The victim is a root-only directory next to
it holding "another certificate's" versions (keys 0600). Each attack races a real certd (CLI
renewals against Pebble, or the daemon's drift repair), bounded in time and stopping by itself.
Each runs twice:

- ``strict``: certd's StrictModes refuse the deploy directory outright (certd says so);
- ``insecure``: ``insecure_shared_deploy_dir = true`` turns that refusal into a warning, so the
  descriptor-based file operations alone must hold.

Either way the victim's files keep their bytes, modes and link counts.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import wait_until

SCRIPT = Path(__file__).with_name("attacker.py")
PYTHON = "/usr/bin/python3"   # the attacker cannot reach root's interpreter under /root
MODES = ["strict", "insecure"]


def _victim(path: Path) -> Path:
    """Root-only stored versions of another certificate: 0001..0003, a key and 200 files each."""
    path.mkdir(mode=0o700)
    for v in ("0001", "0002", "0003"):
        d = path / v
        d.mkdir(mode=0o700)
        for i in range(200 if v == "0001" else 3):
            (d / f"f{i:03d}").write_bytes(secrets.token_bytes(64))
        (d / "privkey.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + secrets.token_bytes(48).hex().encode() + b"\n")
        for f in d.iterdir():
            os.chmod(f, 0o600)
    return path


def _snapshot(path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``path``: (bytes, mode, link count)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for n in files:
            p = Path(root, n)
            st = os.lstat(p)
            out[str(p.relative_to(path))] = (p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_nlink)
    return out


class Scene:
    """A certd installation deploying into a directory the attacker owns, and a victim beside it."""

    def __init__(self, certd_env: Any, pebble: Any, attacker: Any, mode: str, deploy_cfg: dict[str, Any]) -> None:
        self.attacker, self.mode = attacker, mode
        self.work = attacker.workdir()
        self.deploy = self.work / "deploy"
        self.deploy.mkdir(mode=0o755)
        self.victim = _victim(self.work / "victim")
        self.before = _snapshot(self.victim)
        self.env = certd_env(pebble, workdir=self.work / "certd")
        self.env.dir.mkdir(mode=0o700)
        deploy = {k: str(self.deploy / v) if isinstance(v, str) else v for k, v in deploy_cfg.items()}
        if "files" in deploy:
            deploy["files"] = [{**f, "path": str(self.deploy / f["path"])} for f in deploy["files"]]
        self.cert = self.env.http_cert("www", ["www.example.test"], keep_versions=2, deploy=deploy)
        self.env.write_config([self.cert])
        self.env.run("renew", "--all", check=0)        # version 1, while the directory was root's
        os.chown(self.deploy, attacker.uid, attacker.gid)  # now www-data owns it
        if mode == "insecure":
            self.cert["insecure_shared_deploy_dir"] = True
        self.env.write_config([self.cert])

    def attack(self, name: str, deadline: float) -> Any:
        script = self.attacker.readable(SCRIPT)
        proc = self.attacker.spawn([PYTHON, str(script), name, str(self.deploy), str(self.victim), str(deadline)],
                                   log_path=self.work / f"attacker-{name}.log")
        wait_until(lambda: "ready" in proc.log_text() or not proc.alive, timeout=10, what="attacker ready")
        assert "ready" in proc.log_text(), proc.log_text()
        return proc

    def finish(self, proc: Any, deadline: float) -> str:
        (self.work / "stop").touch()
        wait_until(lambda: not proc.alive, timeout=deadline + 10, what="attacker stopped by itself")
        return proc.log_text()

    def assert_victim_untouched(self) -> None:
        after = _snapshot(self.victim)
        lost = sorted(set(self.before) - set(after))
        changed = sorted(k for k in self.before if k in after and after[k] != self.before[k])
        assert not lost and not changed and set(after) == set(self.before), \
            f"victim files lost: {lost[:5]} ({len(lost)}), changed: {changed[:5]} ({len(changed)})"

    def assert_refused(self, out: str, insecure_reason: str) -> None:
        if self.mode == "strict":
            assert "refusing to deploy" in out and str(self.deploy) in out and "owned by" in out, out
        else:
            assert insecure_reason in out, out


@pytest.mark.parametrize("mode", MODES)
def test_f1_versions_dir_swapped_for_a_symlink(certd_env: Any, pebble: Any, attacker: Any, mode: str) -> None:
    """F1: the owner turns .www.versions into a symlink to another certificate's versions; a
    forced renewal is refused and never prunes or zeroes what the symlink leads to."""
    scene = Scene(certd_env, pebble, attacker, mode, {"live_dir": "www"})
    proc = scene.attack("f1", 10)
    r = scene.env.run("renew", "--force", "www", "--reason", "attack f1")
    log = scene.finish(proc, 10)
    assert "f1: .www.versions -> victim" in log
    scene.assert_victim_untouched()
    assert r.returncode == 1, r.stdout + r.stderr
    scene.assert_refused(r.stdout + r.stderr, "is not a real directory")


@pytest.mark.parametrize("mode", MODES)
def test_f3_leftover_subdir_swapped_for_a_symlink_mid_walk(certd_env: Any, pebble: Any, attacker: Any,
                                                           mode: str) -> None:
    """F3: the owner plants a temp-looking directory and swaps its subdirectory for a symlink to
    the victim the moment certd starts deleting in it. certd only removes its own leftovers, and
    walks trees by descriptor: the victim's 200 files keep their bytes."""
    scene = Scene(certd_env, pebble, attacker, mode, {"combined": "www.pem"})
    proc = scene.attack("f3", 20)
    r = scene.env.run("renew", "--force", "www", "--reason", "attack f3")
    log = scene.finish(proc, 20)
    scene.assert_victim_untouched()
    if mode == "strict":
        assert r.returncode == 1
        scene.assert_refused(r.stdout + r.stderr, "")
    else:
        assert r.returncode == 0, r.stdout + r.stderr  # renewed; the planted directory left alone
        assert "certd never touched the planted directory" in log
        assert (scene.deploy / ".www.pem.tmp-attacker" / "s").is_dir()


@pytest.mark.parametrize("mode", MODES)
def test_f4_staged_file_swapped_for_a_symlink_before_the_switch(certd_env: Any, pebble: Any, attacker: Any,
                                                                mode: str) -> None:
    """F4: the owner keeps replacing the name version 2 is staged under with a symlink to a
    root-only key; the switch never makes www.pem that symlink (HAProxy would load the root-only
    file) nor a hard link of the victim, and certd reports the failed rotation."""
    scene = Scene(certd_env, pebble, attacker, mode, {"combined": "www.pem"})
    proc = scene.attack("f4", 20)
    r = scene.env.run("renew", "--force", "www", "--reason", "attack f4")
    scene.finish(proc, 20)
    scene.assert_victim_untouched()
    victim_key = os.lstat(scene.victim / "0001" / "privkey.pem")
    for n in os.listdir(scene.deploy):
        st = os.lstat(scene.deploy / n)
        assert (st.st_dev, st.st_ino) != (victim_key.st_dev, victim_key.st_ino), n
    live = scene.deploy / "www.pem"
    assert not live.is_symlink() and live.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    scene.assert_refused(out, "not staged" if "not staged" in out else "not a regular file certd staged")


@pytest.mark.parametrize("mode", MODES)
def test_f2_drift_repair_mode_fix_raced_onto_a_symlink(certd_env: Any, pebble: Any, attacker: Any,
                                                       mode: str) -> None:
    """F2: for 30 s the owner keeps deleting the live cert.pem (the daemon's drift repair
    re-stages version 1 and fixes the staged file's owner/mode) while flipping the staged name
    to a symlink (through a hop the attacker flips between a copy of the public certificate and
    a root-only 0600 key). The key stays 0600 with its bytes; certd reports the refusal (strict)
    or the drift it repairs (insecure), and keeps running."""
    scene = Scene(certd_env, pebble, attacker, mode, {"files": [{"path": "cert.pem", "content": "cert"}],
                                                       "repair_drift": True})
    scene.env.daemon_extra = {"drift_interval": "1s"}
    scene.env.write_config([scene.cert])
    daemon = scene.env.start_daemon()
    proc = scene.attack("f2", 30)
    wait_until(lambda: not proc.alive, timeout=45, what="attacker stopped by itself")
    log = proc.log_text()
    assert "live files removed" in log, log
    scene.assert_victim_untouched()
    assert daemon.alive
    text = daemon.log_text()
    if mode == "strict":
        assert "refusing to deploy" in text
    else:
        assert "drift_found" in text  # noticed; each repair replaced the symlink with a fresh file
    daemon.stop(timeout=30)
