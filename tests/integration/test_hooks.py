"""Reload hooks against real nginx and HAProxy processes, and command hooks as real processes.

Every assertion about certificates is about what a TLS client receives on the wire.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from certd.core import capabilities
from certd.core.clock import SystemClock
from certd.config import ReloadHook, VerifyEndpoint
from certd.core.errors import HookFailed
from certd.reload.hooks import HookContext, hook_env, run_command, run_reload
from certd.core.model import Bundle
from certd.verify.handshake import await_served
from tests.support.procs import wait_until
from tests.support.server_fixtures import (TestCA, fingerprint, switch_live, write_combined,
                                          write_version)

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "www.example.test"


def context(bundle: Bundle, *, live_dir: Path | None = None, combined: Path | None = None,
            version: int = 2) -> HookContext:
    return HookContext(name="www", domains=(DOMAIN, "example.test"), version=version,
                       bundle=bundle, live_dir=live_dir, combined=combined)


class Live:
    """A live_dir symlink over numbered version directories, as certd.deploy.stage lays it out."""

    def __init__(self, root: Path) -> None:
        self.versions = root / ".www.versions"
        self.dir = root / "www"
        self.version = 0

    def publish(self, bundle: Bundle) -> int:
        self.version += 1
        switch_live(self.dir, write_version(self.versions, self.version, bundle))
        return self.version


@pytest.fixture
def live(tmp_path: Path) -> Live:
    return Live(tmp_path)


def script(tmp_path: Path, name: str, body: str) -> Path:
    """An executable Python script (the test's own interpreter) for use as a command hook."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# --- nginx -----------------------------------------------------------------------------------


def test_nginx_reload_serves_new_certificate(test_ca: TestCA, live: Live, nginx_factory) -> None:
    """After a live_dir switch, the nginx hook reloads and new handshakes get the new leaf."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    live.publish(old)
    server = nginx_factory(live.dir / "fullchain.pem", live.dir / "privkey.pem")
    assert server.served(DOMAIN) == fingerprint(old)
    master = server.pid

    version = live.publish(new)
    result = run_reload(ReloadHook("nginx", timeout=10, config=server.config),
                        context(new, live_dir=live.dir, version=version))
    assert result.ok and result.returncode == 0

    endpoint = VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path)
    served = await_served([endpoint], fingerprint(new), timeout=5, clock=SystemClock())
    assert served[0].info is not None and served[0].info.fingerprint_sha256 == fingerprint(new)
    assert server.pid == master and server.alive  # a reload, not a restart


def test_nginx_mismatched_pair_fails_config_test_without_signal(test_ca: TestCA, live: Live,
                                                                nginx_factory) -> None:
    """A cert/key mismatch fails `nginx -t`: HookFailed quotes nginx, no SIGHUP, old cert served."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    live.publish(old)
    server = nginx_factory(live.dir / "fullchain.pem", live.dir / "privkey.pem")
    version = live.publish(Bundle(new.cert_pem, new.chain_pem, old.key_pem))

    with pytest.raises(HookFailed) as failed:
        run_reload(ReloadHook("nginx", timeout=10, config=server.config),
                   context(new, live_dir=live.dir, version=version))
    message = str(failed.value)
    assert "\n" not in message
    assert "key values mismatch" in message and "[emerg]" in message and "nginx" in message

    assert "SIGHUP" not in server.error_log.read_text()  # the master was never signalled
    assert server.served(DOMAIN) == fingerprint(old)


def test_nginx_reload_script_as_command_hook(test_ca: TestCA, live: Live, nginx_factory) -> None:
    """hooks/nginx-reload works as a command hook: good pair reloads, bad pair exits 1 unsignalled."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    live.publish(old)
    server = nginx_factory(live.dir / "fullchain.pem", live.dir / "privkey.pem")
    hook = ReloadHook("command", timeout=20,
                      command=(str(REPO / "hooks" / "nginx-reload"), "-c", str(server.config)))

    version = live.publish(Bundle(new.cert_pem, new.chain_pem, old.key_pem))
    with pytest.raises(HookFailed, match="key values mismatch"):
        run_reload(hook, context(new, live_dir=live.dir, version=version))
    assert server.served(DOMAIN) == fingerprint(old)

    version = live.publish(new)
    result = run_reload(hook, context(new, live_dir=live.dir, version=version))
    assert "reloaded nginx for www" in result.output
    wait_until(lambda: server.served(DOMAIN) == fingerprint(new), 5, what="nginx to serve the new leaf")


# --- HAProxy ---------------------------------------------------------------------------------


def haproxy_hook(server) -> ReloadHook:
    return ReloadHook("haproxy", timeout=5, socket=server.socket, crt=server.crt)


def test_haproxy_hot_swap_serves_new_certificate_without_restart(tmp_path: Path, test_ca: TestCA,
                                                                 haproxy_factory) -> None:
    """set + commit on the admin socket: the very next handshake gets the new leaf, same PID."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    combined = write_combined(tmp_path / "www.pem", old)
    server = haproxy_factory(combined)
    pid = server.pid
    assert server.served(DOMAIN) == fingerprint(old)

    write_combined(combined, new)  # what the deploy step does before the hook runs
    result = run_reload(haproxy_hook(server), context(new, combined=combined))

    assert result.ok and "Success!" in result.output
    assert server.served(DOMAIN) == fingerprint(new)  # no polling: already swapped
    assert server.pid == pid and server.alive


def test_haproxy_commit_failure_aborts_and_keeps_old_certificate(tmp_path: Path, test_ca: TestCA,
                                                                 haproxy_factory) -> None:
    """A mismatched key fails the commit: HookFailed quotes HAProxy, the transaction is aborted."""
    old, new, later = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    server = haproxy_factory(write_combined(tmp_path / "www.pem", old))

    with pytest.raises(HookFailed) as failed:
        run_reload(haproxy_hook(server), context(Bundle(new.cert_pem, new.chain_pem, old.key_pem)))
    message = str(failed.value)
    assert "\n" not in message and "inconsistencies between private key and certificate" in message
    assert server.served(DOMAIN) == fingerprint(old)
    assert "No ongoing transaction" in server.command(f"abort ssl cert {server.crt}")

    run_reload(haproxy_hook(server), context(later))  # a clean transaction works afterwards
    assert server.served(DOMAIN) == fingerprint(later)


def test_haproxy_unreachable_socket_fails_clearly(tmp_path: Path, test_ca: TestCA) -> None:
    """No admin socket: HookFailed names the socket and the OS error."""
    hook = ReloadHook("haproxy", timeout=2, socket=tmp_path / "missing.sock", crt="/x/www.pem")
    with pytest.raises(HookFailed, match=r"missing\.sock: No such file or directory"):
        run_reload(hook, context(test_ca.issue(DOMAIN)))


def test_haproxy_hotswap_script_as_command_hook(tmp_path: Path, test_ca: TestCA, live: Live,
                                                haproxy_factory) -> None:
    """hooks/haproxy-hotswap swaps from $CERTD_LIVE_DIR, and reports a refused commit."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    server = haproxy_factory(write_combined(tmp_path / "www.pem", old))
    pid = server.pid
    hook = ReloadHook("command", timeout=10,
                      command=(str(REPO / "hooks" / "haproxy-hotswap"), str(server.socket), server.crt))

    version = live.publish(Bundle(new.cert_pem, new.chain_pem, old.key_pem))
    with pytest.raises(HookFailed, match="inconsistencies between private key and certificate"):
        run_reload(hook, context(new, live_dir=live.dir, version=version))
    assert server.served(DOMAIN) == fingerprint(old)

    version = live.publish(new)
    run_reload(hook, context(new, live_dir=live.dir, version=version))
    assert server.served(DOMAIN) == fingerprint(new)
    assert server.pid == pid


# --- command hooks ---------------------------------------------------------------------------


def test_command_hook_gets_explicit_environment_and_literal_argv(tmp_path: Path, test_ca: TestCA,
                                                                 monkeypatch) -> None:
    """The hook sees exactly certd's variables (no inherited ones, no key) and argv verbatim."""
    monkeypatch.setenv("CERTD_TEST_CANARY", "leaked")
    before = dict(os.environ)
    out = tmp_path / "seen.json"
    hook_script = script(tmp_path, "dump", """
        import json, os, sys
        with open(sys.argv[1], "w") as f:
            json.dump({"argv": sys.argv[2:], "env": dict(os.environ)}, f)
    """)
    marker = tmp_path / "pwned"
    args = ["two words", f"$(touch {marker})", "*", "; exit 3", "'quoted'"]
    bundle = test_ca.issue(DOMAIN, "example.test")
    ctx = context(bundle, live_dir=tmp_path / "live" / "www", combined=tmp_path / "www.pem", version=7)

    run_reload(ReloadHook("command", timeout=10, command=(str(hook_script), str(out), *args)), ctx)
    seen = json.loads(out.read_text())
    assert seen["argv"] == args and not marker.exists()

    # /usr/bin/env prints exactly what it got (a Python child would add LC_CTYPE itself)
    result = run_reload(ReloadHook("command", timeout=10, command=("/usr/bin/env",)), ctx)
    env = dict(line.split("=", 1) for line in result.output.splitlines())
    assert env == hook_env(ctx)
    assert env["CERTD_NAME"] == "www" and env["CERTD_VERSION"] == "7" and env["LANG"] == "C"
    assert env["CERTD_DOMAINS"] == env["RENEWED_DOMAINS"] == f"{DOMAIN} example.test"
    assert env["CERTD_LIVE_DIR"] == env["RENEWED_LINEAGE"] == str(tmp_path / "live" / "www")
    assert env["CERTD_SERIAL"] == bundle.info.serial
    assert env["PATH"] == os.environ["PATH"]
    assert "CERTD_TEST_CANARY" not in env and "HOME" not in env
    assert not any("PRIVATE KEY" in v for v in env.values())
    assert dict(os.environ) == before


def test_command_hook_exit_status_fails_with_last_output_line(tmp_path: Path, test_ca: TestCA) -> None:
    """Exit 1: HookFailed is one line with the hook, the status and the output's last line."""
    hook_script = script(tmp_path, "reload-lb", """
        import sys
        print("contacting pool web", flush=True)
        print("reload-lb: pool web: 2 of 3 members refused the certificate", file=sys.stderr)
        sys.exit(1)
    """)
    with pytest.raises(HookFailed) as failed:
        run_reload(ReloadHook("command", timeout=10, command=(str(hook_script),)),
                   context(test_ca.issue(DOMAIN)))
    message = str(failed.value)
    assert "\n" not in message
    assert str(hook_script) in message and "exited with status 1" in message
    assert message.endswith("reload-lb: pool web: 2 of 3 members refused the certificate")

    result = run_command([str(hook_script)], env={"PATH": os.environ["PATH"]}, timeout=10)
    assert (result.ok, result.returncode) == (False, 1)
    assert result.output.splitlines() == ["contacting pool web",
                                          "reload-lb: pool web: 2 of 3 members refused the certificate"]


def test_command_hook_cannot_start(tmp_path: Path, test_ca: TestCA) -> None:
    """A missing or non-executable program is a HookFailed, not a crash."""
    missing = tmp_path / "nope"
    with pytest.raises(HookFailed, match="cannot run .*nope: No such file or directory"):
        run_reload(ReloadHook("command", timeout=5, command=(str(missing),)), context(test_ca.issue(DOMAIN)))
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    with pytest.raises(HookFailed, match="Permission denied"):
        run_reload(ReloadHook("command", timeout=5, command=(str(plain),)), context(test_ca.issue(DOMAIN)))


def test_hanging_hook_and_its_process_group_are_killed_at_timeout(tmp_path: Path, test_ca: TestCA) -> None:
    """A hook ignoring SIGTERM, with a grandchild, is SIGKILLed with its group after the grace."""
    pids = tmp_path / "pids"
    hook_script = script(tmp_path, "hang", f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # inherited by the grandchild
        child = subprocess.Popen(["sleep", "60"])
        with open({str(pids)!r} + ".tmp", "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}")
        os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
        print("waiting for the load balancer", flush=True)
        time.sleep(60)
    """)
    from certd.reload import command as hooks_command
    timeout = 0.5
    start = time.monotonic()
    with pytest.raises(HookFailed) as failed:
        run_reload(ReloadHook("command", timeout=timeout, command=(str(hook_script),)),
                   context(test_ca.issue(DOMAIN)))
    elapsed = time.monotonic() - start

    assert "timed out" in str(failed.value) and "waiting for the load balancer" in str(failed.value)
    assert elapsed < timeout + hooks_command.KILL_GRACE + 0.5
    hook_pid, grandchild = (int(p) for p in pids.read_text().split())
    assert gone(hook_pid) and gone(grandchild)


def test_hook_stopped_by_sigterm_returns_without_waiting_for_grace(tmp_path: Path) -> None:
    """When SIGTERM suffices (shell + background sleep), control returns right after the timeout."""
    from certd.reload import command as hooks_command
    pids = tmp_path / "pids"
    start = time.monotonic()
    result = run_command(["/bin/sh", "-c", f'sleep 60 & echo $$ $! > {pids}; sleep 60'],
                         env={"PATH": os.environ["PATH"]}, timeout=0.3)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok and result.returncode is None
    assert elapsed < 0.3 + hooks_command.KILL_GRACE - 0.2  # SIGKILL's grace was not waited out
    assert all(gone(int(p)) for p in pids.read_text().split())


def test_background_child_holding_output_does_not_block(tmp_path: Path) -> None:
    """A hook that exits 0 leaving a background child on its stdout returns promptly, ok."""
    pidfile = tmp_path / "bg"
    start = time.monotonic()
    result = run_command(["/bin/sh", "-c", f"echo reloaded; sleep 30 & echo $! > {pidfile}"],
                         env={"PATH": os.environ["PATH"]}, timeout=10)
    elapsed = time.monotonic() - start
    try:
        assert result.ok and result.output == "reloaded"
        assert elapsed < 1.0
    finally:
        bg = int(pidfile.read_text())
        os.kill(bg, signal.SIGKILL)  # the test started it, by PID


def test_output_is_truncated_keeping_the_tail(tmp_path: Path) -> None:
    """Huge output is cut in the middle; the last line survives for the error message."""
    from certd.reload import command as hooks_command
    hook_script = script(tmp_path, "chatty", """
        import sys
        for i in range(20000):
            print(f"line {i} " + "x" * 40)
        sys.stdout.flush()  # a pipe is block-buffered: keep the order
        print("final: reload failed", file=sys.stderr)
        sys.exit(2)
    """)
    result = run_command([str(hook_script)], env={}, timeout=10)
    assert result.returncode == 2
    assert len(result.output) < hooks_command.OUTPUT_HEAD + hooks_command.OUTPUT_TAIL + 200
    assert result.output.startswith("line 0 ") and result.output.endswith("final: reload failed")
    assert "bytes of output omitted" in result.output


def test_hook_files_are_executable() -> None:
    """The shipped hook scripts are executable and not writable by others."""
    for name in ("nginx-reload", "haproxy-hotswap"):
        mode = (REPO / "hooks" / name).stat().st_mode
        assert mode & stat.S_IXUSR and not mode & stat.S_IWOTH


def test_haproxy_payload_beyond_cli_buffer(tmp_path: Path, test_ca: TestCA, haproxy_factory) -> None:
    """A >16 kB bundle stalls HAProxy's CLI: HookFailed hints at tune.bufsize; raising it works."""
    old, new = test_ca.issue(DOMAIN), test_ca.issue(DOMAIN)
    padding = test_ca.root.public_bytes(serialization.Encoding.PEM) * 45  # long chain, ~25 kB
    big = Bundle(new.cert_pem, new.chain_pem + padding, new.key_pem)
    assert len(big.combined_pem) > 20_000

    server = haproxy_factory(write_combined(tmp_path / "a.pem", old))
    with pytest.raises(HookFailed, match="raise tune.bufsize"):
        run_reload(ReloadHook("haproxy", timeout=0.5, socket=server.socket, crt=server.crt), context(big))
    assert server.served(DOMAIN) == fingerprint(old)

    roomy = haproxy_factory(write_combined(tmp_path / "b.pem", old), extra_global="    tune.bufsize 65536")
    run_reload(haproxy_hook(roomy), context(big))
    assert roomy.served(DOMAIN) == fingerprint(new)


CAP_DAC_READ_SEARCH, CAP_KILL = 1 << 2, 1 << 5


def _caps_seen_by(tmp_path: Path, run: Any) -> dict[str, int]:
    """What a hook script finds in /proc/self/status: CapEff, CapPrm, CapBnd, CapAmb as ints."""
    script = tmp_path / "caps-hook"
    out = tmp_path / "caps.txt"
    script.write_text(f"#!/bin/sh\ngrep '^Cap' /proc/self/status > {out}\n")
    script.chmod(0o755)
    result = run(str(script))
    assert result.ok, result.output
    return {k: int(v, 16) for k, v in (line.split(":") for line in out.read_text().splitlines())}


def test_a_command_hook_holds_no_capabilities_unless_configured(tmp_path: Path) -> None:
    """certd may hold capabilities (root, or the unit's ambient set); a command hook gets none
    of them: nothing effective, permitted or ambient, and (as root) an empty bounding set."""
    caps = _caps_seen_by(tmp_path, lambda p: run_command([p], env={"PATH": os.environ["PATH"]}, timeout=10))
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, caps
    if os.geteuid() == 0:
        assert caps["CapBnd"] == 0, caps


def test_a_command_hook_keeps_exactly_the_capabilities_its_entry_names(tmp_path: Path) -> None:
    """capabilities = ["CAP_KILL"] on the reload entry: the hook can signal, and nothing more."""
    hook = ReloadHook("command", 10, command=(), capabilities=("CAP_KILL",))
    caps = _caps_seen_by(tmp_path, lambda p: run_command([p], env={"PATH": os.environ["PATH"]}, timeout=10,
                                                         caps=hook.capabilities))
    if os.geteuid() == 0:
        assert caps["CapEff"] == CAP_KILL and caps["CapBnd"] == CAP_KILL, caps
    else:
        assert caps["CapEff"] & ~CAP_KILL == 0, caps


def test_the_nginx_hook_keeps_only_dac_read_search_and_kill(tmp_path: Path) -> None:
    """nginx -t must read every key its config names; nginx -s reload signals the master."""
    caps = _caps_seen_by(tmp_path, lambda p: run_command([p], env={"PATH": os.environ["PATH"]}, timeout=10,
                                                         caps=capabilities.NGINX))
    if os.geteuid() == 0:
        assert caps["CapEff"] == CAP_DAC_READ_SEARCH | CAP_KILL == caps["CapBnd"], caps
