"""certd run as a real process: unattended rotation of short-lived certificates, the control
socket, single-flight, ARI-driven renewal after revocation, backoff while the CA is down, live
config reload, SIGTERM mid-rotation, and socket permissions."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from certd.config import AcmeConfig
from certd.acme.issuer import connect
from certd.core.clock import SystemClock
from certd.store.files import FileStore
from tests.support.certd_env import CertdEnv, key_matches
from tests.support.delay_proxy import DelayProxy
from tests.support.hostile_ca import HostileCA
from tests.support.procs import wait_until
from tests.support.server_fixtures import served_fingerprint

SNI = "www.example.test"


def version_of(env: CertdEnv, name: str = "www") -> int | None:
    return env.status(name)[name]["version"]


@pytest.fixture
def short_pebble(pebble_factory: Any) -> Any:
    """A private Pebble issuing 2-minute certificates."""
    return pebble_factory(validity=120)


@pytest.mark.slow
def test_daemon_rotates_short_certificates_unattended_with_nginx_verified(
        tmp_path: Path, certd_env: Any, short_pebble: Any, nginx_factory: Any,
        request: pytest.FixtureRequest) -> None:
    """Two-minute certificates renewed with 90 s left: three unattended rotations, nginx verified each time.

    Pebble 2.10's ARI window is its ideal point ± 24 h, the whole life of a two-minute certificate,
    and a plausible window wins over renew_before: the CA is reached through a proxy that hides
    ARI, so renew_before decides and the test knows when each rotation is due."""
    env = certd_env(short_pebble)
    ca = HostileCA(short_pebble, tmp_path).start()
    request.addfinalizer(ca.stop)
    ca.hide_ari = True
    env.acme_extra["directory"] = ca.directory_url
    env.refresh_root()
    live = tmp_path / "live" / "www"
    base = env.http_cert("www", [SNI], deploy={"live_dir": str(live)})
    env.write_config([base])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    env.write_config([{**base, "renew_before": "90s",
                       "reload": [{"hook": "nginx", "config": str(nginx.config)}],
                       "verify": [{"endpoint": f"127.0.0.1:{nginx.port}", "ca_bundle": str(env.root_path)}]}])
    daemon = env.start_daemon()
    seen = {served_fingerprint(nginx.port, SNI)}
    for expected in (2, 3, 4):
        wait_until(lambda expected=expected: (version_of(env) or 0) >= expected, timeout=75, what=f"version {expected}")
        row = env.status("www")["www"]
        assert row["last_result"] == "success"
        wait_until(lambda row=row: served_fingerprint(nginx.port, SNI) == row["fingerprint_sha256"], timeout=5,
                   what="nginx serving the committed certificate")
        seen.add(row["fingerprint_sha256"])
    assert len(seen) == 4
    daemon.stop(timeout=30)
    assert daemon.returncode == 0


def test_forced_renewal_joins_the_scheduled_one(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """A forced renewal arriving during a scheduled rotation joins it: one order, one new version."""
    env = certd_env(pebble)
    release = tmp_path / "release"
    gate = tmp_path / "gate-hook"  # holds the scheduled rotation until the test lets it go
    gate.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.02; done\n")
    gate.chmod(0o755)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")},
                                    reload=[{"command": [str(gate)], "timeout": "60s"}])])
    daemon = env.start_daemon()  # no certificate yet: the scheduled job starts at once
    wait_until(lambda: env.status("www")["www"]["rotation"] is not None, timeout=30, what="rotation in progress")
    forced = subprocess.Popen(env.argv("renew", "www", "--force", "--wait", "--reason", "incident 42"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: "renewal_joined" in daemon.log_text(), timeout=30, what="the forced renewal joining")
    release.touch()
    out, err = forced.communicate(timeout=60)
    assert forced.returncode == 0, err
    assert "joined the scheduled rotation" in err
    assert version_of(env) == 1
    assert FileStore(env.state_dir).versions("www") == [1]
    daemon.stop(timeout=30)


@contextmanager
def forced_renewal_joining_a_held_check(env: CertdEnv, pebble: Any, live: Path,
                                        reason: str) -> Iterator[tuple[Any, DelayProxy, subprocess.Popen[str]]]:
    """A daemon whose start-up ARI check of 'www' (issued, so nothing due) is held at the CA,
    and `renew www --force --wait` joined to that check: (daemon, CA proxy, the renew process)."""
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(live)})])
    env.run("renew", "--all", check=0)
    with DelayProxy(pebble.ports.acme) as slow_ca:
        env.acme_extra["directory"] = f"https://127.0.0.1:{slow_ca.port}/dir"
        env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(live)})])
        slow_ca.hold()  # the CA answers the check only when the test releases it
        daemon = env.start_daemon()  # no ARI window known yet: the first check asks the CA at once
        wait_until(lambda: slow_ca.connections >= 1, timeout=30, what="the start-up check asking the CA")
        forced = subprocess.Popen(env.argv("renew", "www", "--force", "--wait", "--reason", reason),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "renewal_joined" in daemon.log_text(), timeout=30, what="the forced renewal joining")
        yield daemon, slow_ca, forced


def test_forced_renewal_joining_a_check_that_finds_nothing_due_still_renews(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """A forced renewal arriving while the daemon's start-up ARI check runs: that check renews
    nothing, so the forced renewal runs right after it, in the same flight; the operator gets a new certificate."""
    env = certd_env(pebble)
    with forced_renewal_joining_a_held_check(env, pebble, tmp_path / "live", "key exposure drill") as (daemon, ca, forced):
        ca.release()
        out, err = forced.communicate(timeout=60)
        assert forced.returncode == 0, err
        assert "joined the scheduled rotation" in err and "now the forced renewal" in err, err
        assert "renewed: version 2" in out, out
        assert version_of(env) == 2
        assert FileStore(env.state_dir).load("www", 2).meta["reason"] == "key exposure drill"
        daemon.stop(timeout=30)


def test_forced_renewal_waiting_behind_a_check_when_the_daemon_stops_is_told_it_did_not_run(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """The same join, then SIGTERM before the check ends: the daemon starts no renewal while
    stopping, and the operator's `renew --force --wait` exits 1 saying so, not 0 with "renews at"."""
    env = certd_env(pebble)
    with forced_renewal_joining_a_held_check(env, pebble, tmp_path / "live", "drill") as (daemon, ca, forced):
        os.kill(daemon.pid, signal.SIGTERM)
        wait_until(lambda: "daemon_stopping" in daemon.log_text(), timeout=30, what="the daemon stopping")
        ca.release()
        out, err = forced.communicate(timeout=60)
        wait_until(lambda: not daemon.alive, timeout=30, what="daemon exit")
    assert forced.returncode == 1, (out, err)
    assert "did not run: certd is shutting down" in out + err, (out, err)
    assert daemon.returncode == 0
    assert version_of(env) == 1


def test_renew_wait_through_the_socket_shows_the_steps(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """renew --force --wait via the daemon streams each step and exits with the outcome."""
    env = certd_env(pebble)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")})])
    env.run("renew", "--all", check=0)
    daemon = env.start_daemon()
    r = env.run("renew", "www", "--force", "--wait", "--reason", "rotate after audit", check=0)
    for step in ("ordering", "issued serial", "staged version 2", "switched to version 2", "committed version 2"):
        assert step in r.stderr, r.stderr
    assert "renewed: version 2" in r.stdout
    meta = FileStore(env.state_dir).load("www", 2).meta
    assert meta["reason"] == "rotate after audit" and meta["initiator"].startswith("uid=0(root)")
    daemon.stop(timeout=30)


def test_certificate_revoked_behind_certds_back_is_renewed_promptly(tmp_path: Path, certd_env: Any, short_pebble: Any) -> None:
    """When ARI says 'renew now' after a revocation, the daemon renews within seconds.

    Revoked before the daemon starts: Pebble 2.10's ARI window for an unrevoked certificate is
    its ideal point ± 24 h, the whole life of a two-minute certificate, so a daemon already
    running could renew it at any moment before the revocation."""
    env = certd_env(short_pebble)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")})])
    env.run("renew", "--all", check=0)
    store = FileStore(env.state_dir)
    version = env.renew_until_ari_finds("www")
    old = store.load("www", version).bundle
    issuer = connect(AcmeConfig(short_pebble.directory_url, ca_bundle=short_pebble.ca_bundle), store, SystemClock())
    issuer.revoke(old.cert_pem, 1)  # keyCompromise, by someone else
    issuer.close()
    assert short_pebble.cert_status(old.info.serial)["Status"] == "Revoked"
    daemon = env.start_daemon()
    wait_until(lambda: version_of(env) == version + 1, timeout=40, what="renewal after revocation")
    assert "ARI window ended" in store.load("www", version + 1).meta["reason"]
    daemon.stop(timeout=30)


def test_ca_down_backs_off_then_renews_soon_after_it_returns(tmp_path: Path, certd_env: Any, short_pebble: Any) -> None:
    """With the CA down the daemon retries with growing delays, and renews promptly once it is back."""
    env = certd_env(short_pebble)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")})])
    short_pebble.stop()
    daemon = env.start_daemon()  # nothing issued yet: due at once, but the CA is down
    wait_until(lambda: env.status("www")["www"]["failures"] >= 3, timeout=30, what="three failed attempts")
    # Backoff 2 s, 4 s, 8 s...: three failures take ~6 s; without backoff there would be hundreds.
    assert daemon.log_text().count("renewal_failed") <= 4
    assert "not reachable" in env.status("www")["www"]["last_error"]
    short_pebble.start()
    # "Promptly" means at the retry the daemon announced, not after some fixed time: on a loaded
    # machine the status polls above can let a fourth failure (next try 16 s later) slip in.
    row = env.status("www")["www"]
    planned = max(datetime.fromisoformat(t) for t in (row["next_renewal"], row["retry_after"]) if t)
    lead = max((planned - datetime.now(timezone.utc)).total_seconds(), 0.0)
    assert lead <= 40, f"the next try is {lead:.0f} s away: the backoff grew past first-issuance doubling"
    wait_until(lambda: version_of(env) == 1, timeout=lead + 20, what="issuance at the announced retry")
    row = env.status("www")["www"]
    assert row["failures"] == 0 and row["last_result"] == "success"
    daemon.stop(timeout=30)


def test_invalid_config_edit_is_rejected_and_a_valid_one_applied(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """A broken edit keeps the running config; a valid edit adds a certificate that is then issued."""
    env = certd_env(pebble)
    www = env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live-www")})
    env.write_config([www])
    daemon = env.start_daemon()
    wait_until(lambda: version_of(env) == 1, timeout=30, what="www issued")
    env.config_path.write_text(env.config_path.read_text() + "\nbogus_key = 1\n")
    wait_until(lambda: "config_rejected" in daemon.log_text(), timeout=10, what="rejection logged")
    assert "bogus_key" in daemon.log_text()
    assert daemon.alive
    env.write_config([www, env.http_cert("api", ["api.example.test"], deploy={"live_dir": str(tmp_path / "live-api")})])
    wait_until(lambda: "config_reloaded" in daemon.log_text(), timeout=10, what="reload logged")
    wait_until(lambda: env.status().get("api", {}).get("version") == 1, timeout=30, what="api issued")
    daemon.stop(timeout=30)


def test_sighup_reloads_and_the_reload_command_reports_problems(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """certd reload prints the problems of a broken file and the daemon keeps its config."""
    env = certd_env(pebble)
    env.write_config([env.http_cert("www", [SNI])])
    daemon = env.start_daemon()
    env.config_path.write_text(env.config_path.read_text().replace('challenge = "http-01"', 'challenge = "http-03"'))
    r = env.run("reload", check=2)
    assert "unknown challenge 'http-03'" in r.stderr and "keeps running" in r.stderr
    env.write_config()
    os.kill(daemon.pid, signal.SIGHUP)
    assert daemon.alive
    daemon.stop(timeout=30)


def test_sigterm_during_a_rotation_finishes_it_and_exits_0(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """SIGTERM mid-rotation: the rotation reaches a safe point, the daemon exits 0, disk is consistent."""
    env = certd_env(pebble)
    slow = tmp_path / "slow-hook"
    slow.write_text("#!/bin/sh\nsleep 1\n")
    slow.chmod(0o755)
    live = tmp_path / "live"
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(live)}, reload=[{"command": [str(slow)]}])])
    daemon = env.start_daemon()
    wait_until(lambda: env.status("www")["www"]["rotation"] is not None, timeout=30, what="rotation in progress")
    os.kill(daemon.pid, signal.SIGTERM)
    wait_until(lambda: not daemon.alive, timeout=30, what="daemon exit")
    assert daemon.returncode == 0
    row = env.status("www")["www"]
    assert row["rotation"] is None and row["version"] == 1
    assert key_matches(live / "fullchain.pem", live / "privkey.pem")


def test_sigterm_during_start_up_recovery_finishes_what_runs_defers_the_rest_exits_0(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """systemctl stop while the daemon is still finishing rotations a crash interrupted (its
    control socket already answers): the one being finished completes, the one not yet begun
    is left to its journal (a stop must not wait for them all), a renewal asked for meanwhile
    is answered "not run", and the daemon exits 0, not killed by the signal. The next start
    finishes the other."""
    env = certd_env(pebble)
    env.daemon_extra["workers"] = 1  # one recovery at a time: 'api' waits behind 'www'
    live = {n: tmp_path / f"live-{n}" for n in ("www", "api")}
    certs = [env.http_cert(n, [f"{n}.example.test"], deploy={"live_dir": str(live[n])}) for n in live]
    env.write_config(certs)
    env.run("renew", "--all", check=0)
    for n in live:
        r = env.run("renew", n, "--force", env={"CERTD_CRASH_AT": "switched"})
        assert r.returncode == -9, r.stderr
    started, release = tmp_path / "hook-started", tmp_path / "hook-release"
    gate = tmp_path / "gate-hook"  # holds a recovery's reload until the test has sent SIGTERM
    gate.write_text(f"#!/bin/sh\necho \"$CERTD_NAME\" >> {started}\nwhile [ ! -e {release} ]; do sleep 0.05; done\n")
    gate.chmod(0o755)
    env.write_config([{**c, "reload": [{"command": [str(gate)]}]} for c in certs])
    daemon = env.start_daemon()
    wait_until(started.exists, timeout=30, what="the first recovery's reload hook running")
    asked = subprocess.Popen(env.argv("renew", "--all", "--force", "--wait"),  # waits for the scheduler
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: "renewal_requested" in daemon.log_text(), timeout=30, what="a renewal asked for meanwhile")
    os.kill(daemon.pid, signal.SIGTERM)
    release.touch()
    wait_until(lambda: not daemon.alive, timeout=30, what="daemon exit")
    assert daemon.returncode == 0, daemon.log_text()[-2000:]
    out, err = asked.communicate(timeout=30)
    assert asked.returncode == 1 and "not run: certd was stopped while it was starting" in out + err, (out, err)
    first = started.read_text().split()
    assert len(first) == 1, first
    (done,), (deferred,) = first, set(live) - set(first)
    rows = env.status()
    assert rows[done]["rotation"] is None and rows[done]["version"] == 2
    assert rows[deferred]["rotation"] is not None and "recovery_deferred" in daemon.log_text()
    for n in live:
        assert key_matches(live[n] / "fullchain.pem", live[n] / "privkey.pem")
    daemon = env.start_daemon()
    wait_until(lambda: env.status(deferred)[deferred]["rotation"] is None, timeout=30, what="the deferred recovery")
    assert env.status(deferred)[deferred]["version"] == 2
    daemon.stop(timeout=30)


def run_cli_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run certd's CLI entry point in a child process that dropped to uid/gid 65534 (nobody).

    A fork of this process rather than an exec: the venv's interpreter lives under /root,
    which nobody cannot traverse, but the code path is exactly the CLI's."""
    import gettext  # noqa: F401  imported lazily by argparse; nobody cannot read /root later
    import locale  # noqa: F401

    import importlib
    import pkgutil

    import certd
    for mod in pkgutil.walk_packages(certd.__path__, "certd."):  # every module the CLI may import lazily
        importlib.import_module(mod.name)
    from certd import cli
    cli.build_parser().parse_args(argv)  # warm every lazy import the CLI path takes
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            sys.stderr = os.fdopen(write_fd, "w")  # pytest has replaced sys.stderr; write to our pipe
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            rc = cli.main(argv)
            sys.stderr.flush()
            os._exit(rc)
        except BaseException:
            os._exit(99)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_caller_without_permission_on_the_socket_is_refused(certd_env: Any, pebble: Any) -> None:
    """An unprivileged user cannot use the control socket (0660 root): clear error, exit 2, nothing done."""
    d = Path(tempfile.mkdtemp(prefix="certd-perm-"))
    d.chmod(0o755)
    env = certd_env(pebble, d)
    ca = d / "acme-ca.pem"
    ca.write_bytes(Path(pebble.ca_bundle).read_bytes())
    ca.chmod(0o644)
    env.acme_extra["ca_bundle"] = str(ca)
    env.write_config([env.http_cert("www", [SNI])])
    env.config_path.chmod(0o644)
    daemon = env.start_daemon()
    wait_until(lambda: version_of(env) == 1, timeout=30, what="www issued")
    assert stat.S_IMODE(env.socket.stat().st_mode) == 0o660
    rc, err = run_cli_as_nobody(["--config", str(env.config_path), "renew", "www", "--force"])
    assert rc == 2, err
    assert "permission denied on the control socket" in err and "Traceback" not in err
    assert version_of(env) == 1
    daemon.stop(timeout=30)


def test_recovered_ca_is_used_at_once_not_after_the_backoff(tmp_path: Path, certd_env: Any, pebble_factory: Any) -> None:
    """A certificate backing off (60 s+) because the CA was down renews within seconds of the CA's return."""
    peb = pebble_factory()  # long-lived certificates: backoff base 60 s
    env = certd_env(peb)
    env.daemon_extra["ca_probe_interval"] = "1s"
    live = str(tmp_path / "live")
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": live})])
    env.run("renew", "--all", check=0)
    peb.stop()
    # a new name makes the certificate due now, while the CA is down
    env.write_config([env.http_cert("www", [SNI, "api.example.test"], deploy={"live_dir": live})])
    daemon = env.start_daemon()
    wait_until(lambda: env.status("www")["www"]["failures"] >= 1, timeout=30, what="a failed attempt")
    row = env.status("www")["www"]
    assert "not reachable" in row["last_error"] and "backoff" in row["renewal_reason"]
    peb.start()
    wait_until(lambda: version_of(env) == 2, timeout=15, what="renewal soon after the CA came back")
    assert "ca_reachable_again" in daemon.log_text()
    assert env.status("www")["www"]["failures"] == 0
    daemon.stop(timeout=30)


def test_the_listing_shows_the_daemons_renewal_at_once_and_a_hand_edit_after_reload(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """certd status (every certificate) through the daemon answers from what the daemon knows
    (100,000 rows in under a second): its own renewal shows at once; a hand edit of the state
    directory once `certd reload` (or the 5-minute recheck) looked, and in `status NAME` at once."""
    env = certd_env(pebble)
    env.write_config([env.http_cert("www", [SNI]), env.http_cert("api", ["api.example.test"])])
    env.run("renew", "--all", check=0)
    daemon = env.start_daemon()
    assert {n: r["version"] for n, r in env.status().items()} == {"www": 1, "api": 1}
    env.run("renew", "--force", "www", "--wait", "--reason", "test", check=0)
    assert {n: r["version"] for n, r in env.status().items()} == {"www": 2, "api": 1}  # its own write: at once

    cdir = env.state_dir / "certs" / "www"
    (cdir / "by-hand").symlink_to("versions/0001")  # as a restore of a snapshot would: back to version 1
    (cdir / "by-hand").replace(cdir / "current")
    assert env.status()["www"]["version"] == 2  # not looked at yet
    env.run("reload", check=0)
    assert {n: r["version"] for n, r in env.status().items()} == {"www": 1, "api": 1}

    (cdir / "by-hand").symlink_to("versions/0002")
    (cdir / "by-hand").replace(cdir / "current")
    assert env.status("www")["www"]["version"] == 2  # named: read afresh
    daemon.stop(timeout=30)
    assert daemon.returncode == 0
