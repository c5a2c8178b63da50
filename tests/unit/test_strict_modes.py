"""StrictModes on real directories: who else can write a deploy directory or a hook program."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from certd.deploy import stage as deploy
from certd.deploy import strictmodes
from certd.config import CertificateConfig, DeployConfig, ReloadHook
from certd.core.errors import StoreError
from tests.support.certs import make_bundle

NOBODY = pwd.getpwnam("nobody").pw_uid
WWW_DATA = grp.getgrnam("www-data").gr_gid


def _cert(live: Path, *, insecure: bool = False, hooks: tuple[ReloadHook, ...] = ()) -> CertificateConfig:
    return CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(live_dir=live),
                             reload=hooks, insecure_shared_deploy_dir=insecure)


def _dir(path: Path, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_root_owned_dirs_under_tmp_are_safe(tmp_path):
    """pytest's tmp dirs (root 0700 under the sticky /tmp) are safe: the tests keep working."""
    assert strictmodes.certificate_problems(_cert(tmp_path / "ssl" / "www")) == []


@pytest.mark.parametrize("mode,uid,gid,why", [
    (0o755, NOBODY, 0, "owned by nobody"),
    (0o775, 0, WWW_DATA, "writable by group www-data"),
    (0o757, 0, 0, "writable by everyone"),
])
def test_deploy_dir_others_can_write_is_named_with_owner_and_fix(tmp_path, mode, uid, gid, why):
    """Owner, group-write and other-write by someone else each make the deploy dir unsafe:
    one line naming the path, the owner and the fix."""
    d = _dir(tmp_path / "ssl", mode, uid, gid)
    (line,) = strictmodes.certificate_problems(_cert(d / "www"))
    assert f"deploy directory {d} is {why}" in line
    assert f"chown root:root {d} && chmod go-w {d}" in line and "insecure_shared_deploy_dir" in line


def test_unsafe_parent_makes_the_deploy_dir_unsafe(tmp_path):
    """A safe deploy dir inside a directory someone else owns is still unsafe (they can rename it)."""
    shared = _dir(tmp_path / "shared", 0o755, NOBODY, 0)
    d = _dir(shared / "ssl")
    (line,) = strictmodes.certificate_problems(_cert(d / "www"))
    assert f"its parent {shared} is owned by nobody" in line


def test_root_owned_sticky_dir_is_safe_other_sticky_is_not(tmp_path):
    """A root-owned sticky dir (like /tmp) is safe; the same owned by another user is not."""
    assert strictmodes.certificate_problems(_cert(_dir(tmp_path / "t", 0o1777) / "www")) == []
    assert strictmodes.certificate_problems(_cert(_dir(tmp_path / "u", 0o1777, NOBODY) / "www"))


def test_symlinked_deploy_dir_checks_the_real_path_too(tmp_path):
    """A deploy dir reached through a symlink is judged by where it really is."""
    real = _dir(tmp_path / "real", 0o755, NOBODY, 0)
    os.symlink(real, tmp_path / "ssl")
    (line,) = strictmodes.certificate_problems(_cert(tmp_path / "ssl" / "www"))
    assert f"{real} is owned by nobody" in line


def test_deploy_is_refused_and_nothing_written(tmp_path):
    """stage() into an unsafe deploy dir fails with one line; the directory stays empty."""
    d = _dir(tmp_path / "ssl", 0o755, NOBODY, 0)
    with pytest.raises(StoreError, match=rf"refusing to deploy: certificate www: deploy directory {d} is owned by nobody"):
        deploy.stage(_cert(d / "www"), 1, make_bundle())
    assert os.listdir(d) == []


def test_insecure_shared_deploy_dir_warns_and_deploys(tmp_path, caplog):
    """insecure_shared_deploy_dir = true: a loud warning, and the deploy happens."""
    d = _dir(tmp_path / "ssl", 0o755, NOBODY, 0)
    cert = _cert(d / "www", insecure=True)
    deploy.stage(cert, 1, make_bundle())
    deploy.switch(cert, 1)
    assert os.readlink(d / "www") == ".www.versions/0001"
    assert any("INSECURE" in r.getMessage() and str(d) in r.getMessage() for r in caplog.records)


def test_hook_program_others_can_replace_is_refused_as_root(tmp_path):
    """As root, a hook program owned by another user, or group-writable by another group, is an error."""
    assert os.geteuid() == 0
    bindir = _dir(tmp_path / "bin")
    owned = bindir / "owned"
    owned.write_text("#!/bin/sh\n")
    os.chown(owned, NOBODY, 0)
    grw = bindir / "grw"
    grw.write_text("#!/bin/sh\n")
    os.chown(grw, 0, WWW_DATA)
    os.chmod(grw, 0o775)
    ok = bindir / "ok"
    ok.write_text("#!/bin/sh\n")
    hooks = tuple(ReloadHook("command", command=(str(p),)) for p in (owned, grw, ok))
    lines = strictmodes.hook_problems(_cert(tmp_path / "ssl" / "www", hooks=hooks))
    assert len(lines) == 2
    assert f"hook program {owned} is owned by nobody" in lines[0]
    assert f"hook program {grw} is writable by group www-data" in lines[1]


def _config(tmp_path: Path, deploy_dir: Path, extra: str = "") -> Path:
    path = tmp_path / "certd.toml"
    path.write_text(f"""
[daemon]
state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/control.sock"
[acme]
directory = "https://127.0.0.1:14000/dir"
[[certificate]]
name = "www"
domains = ["www.example.test"]
http01_listen = "127.0.0.1:5002"
{extra}
[certificate.deploy]
live_dir = "{deploy_dir}/www"
""")
    return path


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(path), "check-config"],
                          capture_output=True, text=True, timeout=60)


def test_check_config_unsafe_deploy_dir_exits_2_and_insecure_flag_warns(tmp_path):
    """check-config: exit 2 and one line for an unsafe deploy dir; with the per-certificate
    flag, exit 0 and a WARNING line."""
    d = _dir(tmp_path / "ssl", 0o755, NOBODY, 0)
    r = _check_config(_config(tmp_path, d))
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert f"deploy directory {d} is owned by nobody" in line and "chown root:root" in line
    r = _check_config(_config(tmp_path, d, "insecure_shared_deploy_dir = true"))
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and str(d) in r.stderr


def test_deploy_with_a_replaceable_hook_is_refused_as_root(tmp_path):
    """As root, stage() refuses while a hook program is owned by another user: the hook would
    run as root after the switch. insecure_shared_deploy_dir does not waive it."""
    hook = _dir(tmp_path / "bin") / "reload"
    hook.write_text("#!/bin/sh\n")
    os.chown(hook, NOBODY, 0)
    cert = _cert(tmp_path / "ssl" / "www", insecure=True, hooks=(ReloadHook("command", command=(str(hook),)),))
    with pytest.raises(StoreError, match=rf"refusing to deploy: certificate www: hook program {hook} is owned by nobody"):
        deploy.stage(cert, 1, make_bundle())
    assert not (tmp_path / "ssl" / "www").exists()


def test_renewal_into_an_unsafe_deploy_dir_is_refused_before_any_order(tmp_path):
    """A renewal for a certificate whose deploy dir others can write fails at once, naming the
    directory: no order is placed at the CA (none is reachable here), nothing is stored."""
    from certd.core.clock import FakeClock
    from certd.config import AcmeConfig, Config, DaemonConfig
    from certd.engine.manager import Manager
    from certd.store.files import FileStore
    from datetime import datetime, timezone
    d = _dir(tmp_path / "ssl", 0o755, NOBODY, 0)
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:9/dir"), (_cert(d / "www"),))
    mgr = Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=FakeClock(datetime(2026, 3, 1, tzinfo=timezone.utc)))
    (outcome,) = mgr.renew(list(cfg.certificates), force=True, reason="test", initiator="test")
    assert outcome.result == "failed"
    assert f"refusing to deploy: certificate www: deploy directory {d} is owned by nobody" in outcome.message
    assert mgr.store.current("www") is None
