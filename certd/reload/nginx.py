"""The nginx reload hook: ``nginx -t``, then SIGHUP to the master, then wait until the old
workers have stopped accepting (see certd/reload/hooks.py for why); and the gate that makes deploy
switches and reloads of one nginx take turns.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from certd.config import ReloadHook
from certd.core.clock import Clock, wait_for
from certd.core import capabilities
from certd.reload.command import DEFAULT_PATH, HookResult, run_command

log = logging.getLogger("certd.hooks")


class NginxGate:
    """Orders certificate switches and reloads for one nginx (one config file).

    nginx opens a certificate and its key one after the other, by path. A deploy switch (one
    rename) landing between the two opens while ``nginx -t`` or the master reads its
    configuration pairs one version's certificate with another's key: nginx refuses the whole
    configuration ("key values mismatch") and the rotation that asked for the reload fails. So
    switches wait while a reload reads certificates, and a reload waits until the switches
    already waiting are done (they take milliseconds; a reload of a large nginx takes seconds).

    And since a reload reads *every* certificate, a rotation whose switch happened before a
    reload started needs no reload of its own once that one succeeded: with many certificates
    on one nginx, rotations finishing together share one reload instead of queueing one each
    (nginx -t and the master's reload cost ~1 s each for 200 server blocks). The bookkeeping
    is in memory; after a restart, the first reload covers every switch made before it.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reading = False          # a reload is reading the certificates now
        self.switching = 0            # switches in progress
        self.waiting = 0              # switches waiting for the reload to finish
        self.switches = 0             # switches done so far
        self.last_switch: dict[str, int] = {}   # certificate -> number of its last switch
        self.reloaded_through = -1    # the last good reload started after this many switches

    @contextmanager
    def switch(self, name: str) -> Iterator[None]:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()  # for whoever watches the gate (tests); a reload waits for 0
            self.cond.wait_for(lambda: not self.reading)
            self.waiting -= 1
            self.switching += 1
        try:
            yield
        finally:
            with self.cond:
                self.switching -= 1
                self.switches += 1
                self.last_switch[name] = self.switches
                self.cond.notify_all()

    def reload(self, name: str, deadline: float, run: Callable[[], HookResult], clock: Clock) -> HookResult:
        """Run ``run`` (nginx -t, reload, wait for the old workers) unless a good reload that
        started after ``name``'s last switch already happened; waiting for its turn ends at
        ``deadline`` (on ``clock``'s monotonic time)."""
        # A switch made before this process started (a rotation resumed after a crash) is
        # number 0: any reload since the start began after it.
        def covered() -> bool:
            return self.reloaded_through >= self.last_switch.get(name, 0)

        def free() -> bool:
            return not self.reading and not self.switching and not self.waiting

        with self.cond:
            # Covered ends the wait too: once a reload that began after this switch succeeded,
            # this hook is done, whatever other certificates switch meanwhile. Waiting for the
            # gate to be free instead starved it while a wave kept switching (the fleet soak:
            # 14 applies on a restarted node sat 20 s here with their version served).
            if not wait_for(clock, self.cond, lambda: covered() or free(), max(0.0, deadline - clock.monotonic())):
                return HookResult("nginx", False, None, 0.0, "another reload of this nginx did not finish "
                                  "before this hook's timeout", timed_out=True)
            if covered():
                return HookResult("nginx", True, 0, 0.0, "nginx already reloaded after this switch")
            self.reading, upto = True, self.switches
        ok = False
        try:
            result = run()
            ok = result.ok
            return result
        finally:
            with self.cond:
                self.reading = False
                if ok:
                    self.reloaded_through = max(self.reloaded_through, upto)
                self.cond.notify_all()


_gates: dict[str, NginxGate] = {}
_gates_guard = threading.Lock()


def gate(config: Path | None) -> NginxGate:
    """The gate of the nginx that reads ``config`` (one per config file, for the process's life)."""
    with _gates_guard:
        return _gates.setdefault(str(config), NginxGate())


def reload(hook: ReloadHook, name: str, clock: Clock) -> HookResult:
    """Test, reload and wait for the old workers, unless a reload since ``name``'s last switch did;
    ``hook.timeout`` is measured on ``clock``."""
    deadline = clock.monotonic() + hook.timeout
    return gate(hook.config).reload(name, deadline, lambda: _reload_nginx_locked(hook, deadline, clock), clock)


def _reload_nginx_locked(hook: ReloadHook, deadline: float, clock: Clock) -> HookResult:
    conf = ["-c", str(hook.config)] if hook.config else []
    env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "LANG": "C"}
    test = run_command([hook.binary, "-t", "-q", *conf], env=env, timeout=max(0.1, deadline - clock.monotonic()),
                       caps=capabilities.NGINX)
    if not test.ok:
        why = "timed out" if test.timed_out else _nginx_error_line(test.output)
        return HookResult(test.hook, False, test.returncode, test.duration,
                          f"{test.output}\nconfiguration test failed, nginx not signalled: {why}",
                          test.timed_out)
    master = _nginx_master(hook.config)
    old_workers = _children(master) if master else []
    reload = _hup_master(master, hook.binary, clock) if master else None
    if reload is None:  # master unknown or not nginx's: let nginx find it (and say what is wrong)
        reload = run_command([hook.binary, "-s", "reload", *conf], env=env,
                             timeout=max(0.1, deadline - clock.monotonic()), caps=capabilities.NGINX)
    output = "\n".join(o for o in (test.output, reload.output) if o)
    duration = test.duration + reload.duration
    if not reload.ok and not reload.timed_out:
        output += f"\nreload failed: {_nginx_error_line(reload.output)}"
    elif reload.ok and old_workers:
        started = clock.monotonic()
        if not _wait_retired(old_workers, min(deadline, started + NGINX_RETIRE_WAIT), clock):
            output += f"\nold workers {old_workers} still accepting after {NGINX_RETIRE_WAIT:.0f}s"
            log.warning("nginx_workers_not_retired master=%s workers=%s", master, old_workers)
        duration += clock.monotonic() - started
    return HookResult(reload.hook, reload.ok, reload.returncode, duration, output, reload.timed_out)


def _hup_master(pid: int, label: str, clock: Clock) -> HookResult | None:
    """SIGHUP the master ourselves: ``nginx -s reload`` would first parse the whole configuration
    again (just tested) only to read the same pid file (~1 s for 200 server blocks). None when
    ``pid`` is not a running nginx master (a stale pid file), so the caller asks nginx instead."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not title.startswith(b"nginx: master process"):
        return None
    started = clock.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return None
    return HookResult(label, True, 0, clock.monotonic() - started, f"sent SIGHUP to the nginx master (pid {pid})")


NGINX_RETIRE_WAIT = 3.0
DEFAULT_NGINX_PID = Path("/run/nginx.pid")  # Debian's compiled-in default
_PID_DIRECTIVE = re.compile(r"^\s*pid\s+([^;\s]+)\s*;", re.MULTILINE)


def _nginx_master(config: Path | None) -> int | None:
    """The master's PID from the pid file the config names (or nginx's default); None if unknown."""
    pid_file = DEFAULT_NGINX_PID
    if config is not None:
        try:
            m = _PID_DIRECTIVE.search(config.read_text(errors="replace"))
        except OSError:
            m = None
        if m and Path(m.group(1)).is_absolute():
            pid_file = Path(m.group(1))
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _wait_retired(pids: Sequence[int], deadline: float, clock: Clock) -> bool:
    """Poll until every pid has exited or is an nginx worker "shutting down" (or ``deadline``
    on ``clock``). Polling: the kernel tells nobody when a process changes its title."""
    def retired(pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        return not cmdline or b"shutting down" in cmdline  # empty: a zombie
    while True:
        if all(retired(p) for p in pids):
            return True
        if clock.monotonic() >= deadline:
            return False
        clock.sleep(0.005)


_NGINX_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\]) \d+#\d+: ")


def _nginx_error_line(output: str) -> str:
    """nginx's first ``[emerg]``/``[alert]``/``[crit]``/``[error]`` line — the reason, unlike
    the last line ("configuration file ... test failed"). When the config names an error_log,
    nginx prefixes lines with a timestamp and PIDs; that becomes ``nginx: [emerg] ...``."""
    lines = [line for line in output.splitlines() if line.strip()]
    for line in lines:
        if any(tag in line for tag in ("[emerg]", "[alert]", "[crit]", "[error]")):
            return _NGINX_LOG_PREFIX.sub(r"nginx: \1 ", line.strip())
    return lines[-1].strip() if lines else "(no output)"
