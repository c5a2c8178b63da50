"""What an operator meets in the first week (issue 13), as real processes: the README's
exit-code and error promises over every command, in-process and through the daemon; history
for control_group members; a reader that leaves early; refusals; long domain lists."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.certd_env import ROOT, CertdEnv
from tests.support.procs import wait_until
from tests.support.unpriv import UnprivUser

SNI = "www.example.test"
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root (0700): not for other users


@pytest.fixture(scope="module")
def operator() -> Iterator[UnprivUser]:
    """An on-call engineer: not root, not certd's user; control_group is their group."""
    user = UnprivUser("certdop")
    try:
        yield user
    finally:
        user.remove()


def run_as(user: UnprivUser, env: CertdEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """``certd ARGS`` as ``user``, with the project's packages (same Python minor version)."""
    return user.run([SYSTEM_PYTHON, "-m", "certd.cli", "--config", str(env.config_path), *args],
                    env={"PYTHONPATH": user.python_path()})


def one_error_line(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The README's promise: the documented exit code, nothing on stdout, one line on stderr."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("certd: ") and not lines[0].startswith("certd: certd:"), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return lines[0]


def issued_env(certd_env: Any, pebble: Any, workdir: Path, **daemon: Any) -> CertdEnv:
    env = certd_env(pebble, workdir=workdir)
    shutil.copy(pebble.ca_bundle, workdir / "acme-ca.pem")  # readable wherever the workdir is
    env.acme_extra = {"ca_bundle": str(workdir / "acme-ca.pem")}
    env.daemon_extra = dict(daemon)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(workdir / "live")})])
    os.chmod(env.config_path, 0o644)  # an operator reads the config (it holds no secret)
    env.run("renew", "--all", check=0)
    return env


# -- item 1: history for control_group members ----------------------------------------------

def test_history_for_a_control_group_member_goes_through_the_daemon(certd_env: Any, pebble: Any,
                                                                    operator: UnprivUser) -> None:
    """The state dir is 0700: a control_group member cannot read audit.jsonl. Without a daemon
    they are told what to do (exit 2, one line); with one, the daemon reads it for them."""
    group = grp.getgrgid(operator.gid).gr_name
    env = issued_env(certd_env, pebble, operator.workdir(), control_group=group)
    assert os.stat(env.state_dir).st_mode & 0o777 == 0o700
    line = one_error_line(run_as(operator, env, "history"))
    assert "permission denied" in line and "start the daemon" in line and "root" in line, line

    env.start_daemon()
    r = run_as(operator, env, "history", "www")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["TIME", "EVENT", "NAME"]
    assert any(" www " in row and "success" in row for row in r.stdout.splitlines()[1:]), r.stdout
    as_member = json.loads(run_as(operator, env, "history", "--json").stdout)["records"]
    as_root = json.loads(env.run("history", "--json", check=0).stdout)["records"]
    assert as_member == as_root and as_member
    one_error_line(run_as(operator, env, "history", "nosuch"))  # unknown name: still a usage error


# -- item 2: a reader that leaves early ---------------------------------------------------

def run_into_closed_pipe(env: CertdEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """``certd ARGS | head -0``, deterministically: stdout is a pipe whose reader is gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(env.argv(*args), stdout=w, stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(w)
    return proc


@pytest.mark.parametrize("through_daemon", [False, True], ids=["in-process", "daemon"])
def test_a_reader_that_leaves_early_gets_no_error(tmp_path: Path, certd_env: Any, pebble: Any,
                                                  through_daemon: bool) -> None:
    """`certd status | head -1` printed "certd: internal error: BrokenPipeError" and exited 1."""
    env = issued_env(certd_env, pebble, tmp_path)
    if through_daemon:
        env.start_daemon()
    for args in (("status",), ("status", "--json"), ("history",), ("history", "--json"), ("drift",)):
        r = run_into_closed_pipe(env, *args)
        assert (r.returncode, r.stderr) == (0, ""), (args, r.returncode, r.stderr)


# -- items 3 and 8 ----------------------------------------------------------------------------

def test_a_refused_rollback_says_the_same_thing_in_process_and_through_the_daemon(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """Through the daemon it went to stdout as "www: www has no version 7…", exit 2."""
    env = issued_env(certd_env, pebble, tmp_path)
    local = one_error_line(env.run("rollback", "www", "--to", "7"))
    env.start_daemon()
    remote = one_error_line(env.run("rollback", "www", "--to", "7"))
    assert remote == local, (local, remote)
    assert "www: www" not in remote


def test_renew_all_with_no_certificates_is_nothing_to_do(tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """Through the daemon it said "no certificates named" and exited 2; in-process 0."""
    env = certd_env(pebble)
    env.write_config([])
    assert env.run("renew", "--all").returncode == 0
    env.start_daemon()
    for args in (("renew", "--all"), ("renew", "--all", "--wait"), ("renew",), ("renew", "--all", "--force")):
        r = env.run(*args)
        assert (r.returncode, r.stderr) == (0, ""), (args, r.returncode, r.stderr)


# -- item 11: long domain lists in status ------------------------------------------------------

@pytest.mark.parametrize("through_daemon", [False, True], ids=["in-process", "daemon"])
def test_status_shows_three_domains_and_a_count_unless_wide(tmp_path: Path, certd_env: Any, pebble: Any,
                                                            through_daemon: bool) -> None:
    """A 100-name certificate made ~1,900-character lines."""
    env = certd_env(pebble)
    names = [f"host{i:03}.example.test" for i in range(100)]
    env.write_config([env.http_cert("big", names, deploy={"live_dir": str(tmp_path / "big")}),
                      env.http_cert("small", ["a.example.test"], deploy={"live_dir": str(tmp_path / "small")})])
    if through_daemon:
        env.start_daemon()
    rows = env.run("status", check=0).stdout.splitlines()
    big = next(r for r in rows if r.startswith("big "))
    assert big.endswith("host000.example.test,host001.example.test,host002.example.test (+97 more)"), big
    assert len(big) < 200 and "host003" not in big
    assert next(r for r in rows if r.startswith("small ")).endswith("a.example.test")
    wide = next(r for r in env.run("status", "--wide", check=0).stdout.splitlines() if r.startswith("big "))
    assert wide.endswith(",".join(names))
    assert env.status("big")["big"]["domains"] == names  # --json: every name, as before


# -- the README's exit-code and error promises, over every command ----------------------------

USAGE_ERRORS: list[tuple[str, ...]] = [
    ("frobnicate",),
    ("renew", "nosuch"),
    ("renew", "--force"),
    ("status", "nosuch"),
    ("verify", "nosuch"),
    ("drift", "nosuch"),
    ("rollback", "nosuch"),
    ("rollback", "www", "--to", "9"),
    ("revoke", "www", "--reason", "bogus"),
    ("revoke", "nosuch", "--reason", "superseded"),
    ("history", "nosuch"),
    ("audit",),
    ("audit", "verify", "--head", "xyz"),
]
SUCCESSES: list[tuple[str, ...]] = [
    ("check-config",),
    ("renew",),
    ("renew", "--all"),
    ("status",),
    ("status", "--json"),
    ("status", "--wide", "www"),
    ("verify",),
    ("drift",),
    ("history",),
    ("history", "www", "--json"),
    ("audit", "verify"),
]


@pytest.mark.parametrize("through_daemon", [False, True], ids=["in-process", "daemon"])
def test_every_command_keeps_the_readmes_exit_code_and_error_promises(tmp_path: Path, certd_env: Any,
                                                                     pebble: Any, through_daemon: bool) -> None:
    """0 success or nothing to do, 1 an operation failed, 2 usage or configuration error;
    errors are one line on stderr."""
    env = issued_env(certd_env, pebble, tmp_path)
    if through_daemon:
        env.start_daemon()
        ok = env.run("reload")
        assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
        second = env.run("run")
        assert second.returncode == 2 and "another certd already listens" in second.stderr.splitlines()[-1]
    else:
        one_error_line(env.run("reload"))
    for args in USAGE_ERRORS:
        one_error_line(env.run(*args))
    for args in SUCCESSES:
        r = env.run(*args)
        assert (r.returncode, r.stderr) == (0, ""), (args, r.returncode, r.stdout, r.stderr)
    # 2: refused by the manager (through the daemon: as the flight's outcome), for a certificate
    # never issued (or, through the daemon, while an attempt to issue it is in progress)
    never_issued = {"name": "api", "domains": ["api.example.test"], "challenge": "dns-01",
                    "dns01_hook": ["/bin/false"], "deploy": {"live_dir": str(tmp_path / "api")}}
    env.write_config([*env.certificates, never_issued])
    if through_daemon:
        assert env.run("reload").returncode == 0
    for args in (("rollback", "api"), ("revoke", "api", "--reason", "superseded")):
        one_error_line(env.run(*args))
    # 1: an operation failed. A tampered audit log ...
    audit = env.state_dir / "audit.jsonl"
    audit.write_bytes(audit.read_bytes().replace(b'"outcome": "success"', b'"outcome": "failure"', 1))
    r = env.run("audit", "verify")
    assert r.returncode == 1 and "TAMPERED" in r.stdout
    # ... and a deployed key someone made world-readable.
    os.chmod(tmp_path / "live" / "privkey.pem", 0o644)
    r = env.run("drift")
    assert r.returncode == 1 and "privkey.pem" in r.stdout and "0644" in r.stdout, (r.stdout, r.stderr)
    # 2: a configuration error, even while the daemon runs its last good config.
    env.config_path.write_text(env.config_path.read_text() + "\nbogus = 1\n")
    one_error_line(env.run("check-config"))


# -- items 9 and 10: what the audit log and the report say -------------------------------------

def test_a_failed_rollback_keeps_the_reason_the_serials_and_a_short_message(
        tmp_path: Path, certd_env: Any, pebble: Any, nginx_factory: Any, test_ca: Any) -> None:
    """An endpoint that serves neither version: the rotation fails verification and so does the
    rollback. The operator's --reason stays the record's reason, the error goes in
    detail.error, rollback_failed names both serials, and the message is one short line."""
    env = issued_env(certd_env, pebble, tmp_path)
    other = test_ca.issue(SNI)
    (tmp_path / "other.pem").write_bytes(other.fullchain_pem)
    (tmp_path / "other.key").write_bytes(other.key_pem)
    nginx = nginx_factory(tmp_path / "other.pem", tmp_path / "other.key")
    cert = dict(env.certificates[0], verify_timeout="1s",
                verify=[{"endpoint": f"127.0.0.1:{nginx.port}", "sni": SNI, "ca_bundle": str(test_ca.root_path)}])
    env.write_config([cert])
    r = env.run("renew", "www", "--force", "--reason", "incident 4711", check=1)
    line = r.stdout.strip()
    assert line.startswith("www: ROLLBACK FAILED") and "\n" not in line, r.stdout
    assert len(line) < 300, (len(line), line)
    assert line.count("served serial") == 1, line
    records = json.loads(env.run("history", "www", "--json", check=0).stdout)["records"]
    failed = [x for x in records if x["event"] == "renewal_failed"][-1]
    assert failed["reason"] == "incident 4711", failed
    assert failed["outcome"] == "rollback_failed" and "ROLLBACK FAILED" in failed["detail"]["error"]
    rb = [x for x in records if x["event"] == "rollback_failed"][-1]
    served_before = [x for x in records if x["event"] == "renewed" or x["event"] == "issued"][0]["new_serial"]
    assert rb["new_serial"] == served_before and rb["old_serial"] and rb["old_serial"] != served_before, rb
    assert rb["reason"] == "incident 4711"


def test_a_rotation_resumed_after_a_crash_is_in_the_renew_report(tmp_path: Path, certd_env: Any,
                                                                 pebble: Any) -> None:
    """It showed only as a rotation_resumed WARNING on stderr."""
    env = issued_env(certd_env, pebble, tmp_path)
    assert env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": "switched"}).returncode == -9
    r = env.run("renew", "www", check=0)
    assert "www: resumed a renew to version 2 that a crash interrupted: committed version 2" in r.stdout, r.stdout
    assert env.status("www")["www"]["version"] == 2


# -- item 4: what SIGKILLed writers leave behind ------------------------------------------------

def plant_leftovers(env: CertdEnv, live: Path, tag: str) -> list[Path]:
    """What a SIGKILL between create and rename leaves (the names fsutil.temp_name makes)."""
    certdir = env.state_dir / "certs" / "www"
    staging = live.parent / f".{live.name}.versions" / f".0011.tmp-{tag}"
    staging.mkdir()
    (staging / "privkey.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nstale\n-----END PRIVATE KEY-----\n")
    files = [certdir / f".journal.json.tmp-{tag}", certdir / f".state.json.tmp-{tag}",
             env.state_dir / f".audit.head.tmp-{tag}"]
    for f in files:
        f.write_text("{}")
    return [*files, staging]


def test_stale_temporaries_are_swept_at_start_and_after_each_rotation(tmp_path: Path, certd_env: Any,
                                                                      pebble: Any) -> None:
    """Leftovers of killed writers (19 after 42 kills) were never removed."""
    env = issued_env(certd_env, pebble, tmp_path)
    live = tmp_path / "live"
    at_start = plant_leftovers(env, live, "a1b2c3")
    daemon = env.start_daemon()
    wait_until(lambda: not any(os.path.lexists(p) for p in at_start), timeout=30, what="start-up sweep")
    wait_until(lambda: daemon.log_text().count("stale_temp_removed") == len(at_start), timeout=10,
               what="one log line per leftover")
    after_rotation = plant_leftovers(env, live, "d4e5f6")
    env.run("renew", "www", "--force", "--wait", check=0)
    wait_until(lambda: not any(os.path.lexists(p) for p in after_rotation), timeout=30, what="post-rotation sweep")
    assert os.readlink(live).endswith("0002")  # the live certificate is untouched by the sweep


# -- item 5: a state dir others can read --------------------------------------------------------

def test_a_loose_state_dir_is_tightened_with_a_log_line_and_an_audit_record(tmp_path: Path, certd_env: Any,
                                                                           pebble: Any) -> None:
    """0755 (or 1777 on a fresh tmpfs) was used without a word."""
    env = issued_env(certd_env, pebble, tmp_path)
    os.chmod(env.state_dir, 0o755)
    r = env.run("status", check=0)
    assert "state_dir_tightened" in r.stderr and "0755" in r.stderr, r.stderr
    assert os.stat(env.state_dir).st_mode & 0o7777 == 0o700
    records = json.loads(env.run("history", "--json", check=0).stdout)["records"]
    tightened = [x for x in records if x["event"] == "state_dir_tightened"]
    assert len(tightened) == 1 and tightened[0]["detail"]["old_mode"] == "0755", tightened
    assert env.run("status", check=0).stderr == ""  # once: now it is private

    os.chmod(env.state_dir, 0o1777)  # a fresh tmpfs
    daemon = env.start_daemon()
    wait_until(lambda: "state_dir_tightened" in daemon.log_text(), timeout=30, what="the daemon's log line")
    assert os.stat(env.state_dir).st_mode & 0o7777 == 0o700


def test_a_loose_state_dir_certd_cannot_tighten_is_refused(certd_env: Any, pebble: Any,
                                                          operator: UnprivUser) -> None:
    """Not its owner (nor root): certd refuses to run on it, exit 2, one line saying what to do."""
    env = issued_env(certd_env, pebble, operator.workdir())
    os.chmod(env.state_dir, 0o755)
    line = one_error_line(run_as(operator, env, "status"))
    assert "chmod 700" in line and str(env.state_dir) in line and "0755" in line, line
    assert os.stat(env.state_dir).st_mode & 0o7777 == 0o755
