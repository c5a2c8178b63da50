"""Reload hooks: make the servers pick up the certificate the deploy step just switched to.

Three kinds, one contract: :func:`run_reload` returns a :class:`HookResult` when the server
accepted the new certificate and raises :class:`~certd.errors.HookFailed` (one line: which
hook, exit code or timeout, the line of output that says why) when it did not. Whether the
new certificate is actually *served* is not decided here: ``certd.verify`` checks that with a
real handshake, because a reload that "succeeded" proves little.

- **nginx**: ``nginx -t -c <config>`` first, so a broken certificate/key pair is reported with
  nginx's own error line and the master is never signalled; then SIGHUP to the master named
  by the pid file in that config (``nginx -s reload -c <config>`` when that pid is not a
  running nginx master, so nginx itself says what is wrong). nginx answers
  before its workers have switched: the master starts new workers, *sleeps 100 ms*, and only
  then tells the old ones to stop accepting. During that window both generations answer
  handshakes, so a verification right after a rollback could be satisfied by a stale worker
  that happens to serve the expected (old) certificate while the next client gets the newer
  one. The hook therefore waits until every worker the master had before the reload has
  exited or retitled itself "shutting down" (its listening sockets are closed by then).
  Certificates sharing one nginx take turns with it (:class:`_NginxGate`): no deploy switch
  while nginx reads certificates, and one reload serves every switch made before it began.
- **haproxy**: the runtime API on the admin socket, no reload at all: ``set ssl cert <crt>``
  with fullchain + key as payload, then ``commit ssl cert <crt>``; the next handshake serves
  the new certificate. Replies are free text: success is recognised by HAProxy's fixed
  markers ("Transaction created/updated", "Success!"); on anything else the transaction is
  aborted (HAProxy would otherwise keep it open and refuse the next one). Runtime changes are
  memory-only — the deploy step has already written the combined file, so a restart keeps
  the new certificate.
- **command**: an operator's argv, run without a shell, with an explicit environment
  (:func:`hook_env`, certbot-compatible ``RENEWED_LINEAGE``/``RENEWED_DOMAINS`` included),
  stdin from /dev/null, in its own session. On timeout the whole process group gets SIGTERM,
  then SIGKILL after a short grace, so a hook's grandchildren cannot outlive it and certd
  gets control back promptly. Output (stdout+stderr, truncated) is logged at INFO: a reload
  hook's output is operational, never key material — the key is never in the environment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from certd.config import ReloadHook
from certd.errors import HookFailed
from certd.log import redact
from certd.model import Bundle

log = logging.getLogger(__name__)

#: Output kept per hook run: the head and the tail (the tail says why it failed).
OUTPUT_HEAD = 4 * 1024
OUTPUT_TAIL = 28 * 1024
#: After SIGTERM on timeout, how long the process group gets before SIGKILL.
KILL_GRACE = 1.0
#: After the hook itself exited, how long to keep reading output that a leftover background
#: child might still hold open (we do not wait for such children).
DRAIN_AFTER_EXIT = 0.05
#: Above this payload size a silent HAProxy is probably stuck on its CLI buffer (tune.bufsize,
#: 16384 by default: a 23 kB payload hangs, 13.7 kB works on HAProxy 2.6).
CLI_PAYLOAD_HINT = 14 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the rotation it is part of."""

    name: str                   # the certificate's name in the config
    domains: tuple[str, ...]
    version: int                # the store version now deployed
    bundle: Bundle
    live_dir: Path | None       # [certificate.deploy] live_dir, if configured
    combined: Path | None       # [certificate.deploy] combined, if configured


@dataclass(frozen=True)
class HookResult:
    hook: str                   # which hook, as an operator would recognise it
    ok: bool
    returncode: int | None      # None: timed out, could not start, or not a process (haproxy)
    duration: float             # seconds
    output: str                 # stdout+stderr (or the runtime API's replies), truncated
    timed_out: bool = False


def hook_label(hook: ReloadHook) -> str:
    """``nginx -c /etc/nginx/nginx.conf``, ``haproxy /run/haproxy/admin.sock``, ``/usr/bin/x``."""
    if hook.kind == "nginx":
        return f"nginx -c {hook.config}" if hook.config else "nginx"
    if hook.kind == "haproxy":
        return f"haproxy {hook.socket}"
    return hook.command[0] if hook.command else "command"


def hook_env(ctx: HookContext) -> dict[str, str]:
    """The complete environment of a command hook (nothing else from certd's is inherited).

    ``CERTD_LIVE_DIR``/``RENEWED_LINEAGE`` and ``CERTD_COMBINED`` are present only when that
    deploy target is configured. Never the private key.
    """
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "LANG": "C",
        "CERTD_NAME": ctx.name,
        "CERTD_DOMAINS": " ".join(ctx.domains),
        "CERTD_VERSION": str(ctx.version),
        "CERTD_SERIAL": ctx.bundle.info.serial,
        "CERTD_FINGERPRINT": ctx.bundle.info.fingerprint_sha256,
        "RENEWED_DOMAINS": " ".join(ctx.domains),
    }
    if ctx.live_dir is not None:
        env["CERTD_LIVE_DIR"] = env["RENEWED_LINEAGE"] = str(ctx.live_dir)
    if ctx.combined is not None:
        env["CERTD_COMBINED"] = str(ctx.combined)
    return env


def run_reload(hook: ReloadHook, ctx: HookContext) -> HookResult:
    """Run one reload hook; raise :class:`HookFailed` unless the server took the change."""
    if hook.kind == "nginx":
        result = _reload_nginx(hook, ctx.name)
    elif hook.kind == "haproxy":
        result = _hotswap_haproxy(hook, ctx.bundle)
    elif hook.kind == "command":
        result = run_command(hook.command, env=hook_env(ctx), timeout=hook.timeout)
    else:
        raise HookFailed(f"{ctx.name}: unknown reload hook kind {hook.kind!r}")
    label = hook_label(hook)
    # A hook that prints a key file (set -x, a debugging cat) must not put it in logs or errors.
    result = dataclasses.replace(result, hook=label, output=redact(result.output, [ctx.bundle.key_pem]))
    event = "hook_ran" if result.ok else "hook_failed"
    level = logging.INFO if result.ok else logging.WARNING
    log.log(level, "%s cert=%s hook=%r ok=%s returncode=%s duration=%.3fs output=%r",
            event, ctx.name, label, result.ok, result.returncode, result.duration, result.output,
            extra={"event": event, "cert": ctx.name, "hook": label, "duration": result.duration,
                   "returncode": result.returncode})
    if not result.ok:
        raise HookFailed(f"{ctx.name}: reload hook {label} {_failure(result, hook.kind != 'haproxy')}")
    return result


def run_command(argv: Sequence[str], *, env: Mapping[str, str], timeout: float) -> HookResult:
    """Run ``argv`` (no shell) with exactly ``env``; never raises for what the command does.

    ``ok`` is true only for exit status 0 within ``timeout``. On timeout the process group is
    killed (SIGTERM, SIGKILL after :data:`KILL_GRACE`) and the command reaped.
    """
    label = argv[0] if argv else "<empty command>"
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return HookResult(label, False, None, time.monotonic() - start, f"cannot run {label}: {why}")
    assert proc.stdout is not None
    out = _Output()
    timed_out = not _pump(proc, out, start + timeout)
    if timed_out:
        _kill_group(proc, out)
    else:
        _drain(proc.stdout, out, time.monotonic() + DRAIN_AFTER_EXIT)
    proc.stdout.close()
    returncode = proc.wait()
    duration = time.monotonic() - start
    if timed_out:
        return HookResult(label, False, None, duration, out.text(), timed_out=True)
    return HookResult(label, returncode == 0, returncode, duration, out.text())


# --- nginx ----------------------------------------------------------------------------------


# --- nginx: switches and reloads take turns; one reload serves every switch before it --------

class _NginxGate:
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

    def reload(self, name: str, deadline: float, run: Callable[[], HookResult]) -> HookResult:
        """Run ``run`` (nginx -t, reload, wait for the old workers) unless a good reload that
        started after ``name``'s last switch already happened."""
        with self.cond:
            if not self.cond.wait_for(lambda: not self.reading and not self.switching and not self.waiting,
                                      timeout=max(0.0, deadline - time.monotonic())):
                return HookResult("nginx", False, None, 0.0, "another reload of this nginx did not finish "
                                  "before this hook's timeout", timed_out=True)
            # A switch made before this process started (a rotation resumed after a crash) is
            # number 0: any reload since the start began after it.
            if self.reloaded_through >= self.last_switch.get(name, 0):
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


_gates: dict[str, _NginxGate] = {}
_gates_guard = threading.Lock()
_haproxy_locks: dict[str, threading.Lock] = {}


def _nginx_gate(config: Path | None) -> _NginxGate:
    with _gates_guard:
        return _gates.setdefault(str(config), _NginxGate())


def _haproxy_lock(sock: Path) -> threading.Lock:
    with _gates_guard:
        return _haproxy_locks.setdefault(str(sock), threading.Lock())


@contextmanager
def switching(hooks: Sequence[ReloadHook], name: str) -> Iterator[None]:
    """Run the deploy switch of certificate ``name`` in this block: it waits while an nginx among
    ``hooks`` reads its certificates, and lets that nginx's hook know of the switch."""
    gates = [_nginx_gate(c) for c in sorted({h.config for h in hooks if h.kind == "nginx"}, key=str)]
    with ExitStack() as stack:
        for gate in gates:
            stack.enter_context(gate.switch(name))
        yield


def _reload_nginx(hook: ReloadHook, name: str) -> HookResult:
    deadline = time.monotonic() + hook.timeout
    return _nginx_gate(hook.config).reload(name, deadline, lambda: _reload_nginx_locked(hook, deadline))


def _reload_nginx_locked(hook: ReloadHook, deadline: float) -> HookResult:
    conf = ["-c", str(hook.config)] if hook.config else []
    env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "LANG": "C"}
    test = run_command([hook.binary, "-t", "-q", *conf], env=env, timeout=max(0.1, deadline - time.monotonic()))
    if not test.ok:
        why = "timed out" if test.timed_out else _nginx_error_line(test.output)
        return HookResult(test.hook, False, test.returncode, test.duration,
                          f"{test.output}\nconfiguration test failed, nginx not signalled: {why}",
                          test.timed_out)
    master = _nginx_master(hook.config)
    old_workers = _children(master) if master else []
    reload = _hup_master(master, hook.binary) if master else None
    if reload is None:  # master unknown or not nginx's: let nginx find it (and say what is wrong)
        reload = run_command([hook.binary, "-s", "reload", *conf], env=env,
                             timeout=max(0.1, deadline - time.monotonic()))
    output = "\n".join(o for o in (test.output, reload.output) if o)
    duration = test.duration + reload.duration
    if not reload.ok and not reload.timed_out:
        output += f"\nreload failed: {_nginx_error_line(reload.output)}"
    elif reload.ok and old_workers:
        started = time.monotonic()
        if not _wait_retired(old_workers, min(deadline, started + NGINX_RETIRE_WAIT)):
            output += f"\nold workers {old_workers} still accepting after {NGINX_RETIRE_WAIT:.0f}s"
            log.warning("nginx_workers_not_retired master=%s workers=%s", master, old_workers)
        duration += time.monotonic() - started
    return HookResult(reload.hook, reload.ok, reload.returncode, duration, output, reload.timed_out)


def _hup_master(pid: int, label: str) -> HookResult | None:
    """SIGHUP the master ourselves: ``nginx -s reload`` would first parse the whole configuration
    again (just tested) only to read the same pid file (~1 s for 200 server blocks). None when
    ``pid`` is not a running nginx master (a stale pid file), so the caller asks nginx instead."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not title.startswith(b"nginx: master process"):
        return None
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return None
    return HookResult(label, True, 0, time.monotonic() - started, f"sent SIGHUP to the nginx master (pid {pid})")


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


def _wait_retired(pids: Sequence[int], deadline: float) -> bool:
    """Poll until every pid has exited or is an nginx worker "shutting down"."""
    def retired(pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        return not cmdline or b"shutting down" in cmdline  # empty: a zombie
    while True:
        if all(retired(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


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


# --- HAProxy runtime API --------------------------------------------------------------------


def _hotswap_haproxy(hook: ReloadHook, bundle: Bundle) -> HookResult:
    start = time.monotonic()
    deadline = start + hook.timeout
    if hook.socket is None or not hook.crt:
        return HookResult("haproxy", False, None, 0.0, "haproxy hook needs socket and crt")
    crt = hook.crt
    replies: list[str] = []

    def finish(ok: bool, why: str | None = None, timed_out: bool = False) -> HookResult:
        text = "\n".join(r.strip() for r in replies if r.strip())
        if why:
            text = f"{text}\n{why}" if text else why
        return HookResult("haproxy", ok, None, time.monotonic() - start, text, timed_out)

    # HAProxy keeps one certificate transaction for all its certificates: updates of several
    # certificates on the same HAProxy take turns here, and another client's turn is waited out.
    lock = _haproxy_lock(hook.socket)
    if not lock.acquire(timeout=hook.timeout):
        return finish(False, f"another update on {hook.socket} did not finish within {hook.timeout:g}s", True)
    try:
        return _hotswap_haproxy_locked(hook, bundle, crt, deadline, replies, finish)
    finally:
        lock.release()


def _hotswap_haproxy_locked(hook: ReloadHook, bundle: Bundle, crt: str, deadline: float, replies: list[str],
                            finish: Callable[..., HookResult]) -> HookResult:
    assert hook.socket is not None
    # The payload ends at the first empty line: the PEM must not contain one.
    payload = b"\n".join(line for line in bundle.combined_pem.splitlines() if line.strip())
    try:
        for _attempt in range(HAPROXY_SET_ATTEMPTS):
            _wait_for_turn(hook.socket, crt, deadline, replies)
            reply = haproxy_command(hook.socket, f"set ssl cert {crt} <<\n".encode() + payload + b"\n\n",
                                    deadline)
            replies.append(reply)
            m = _TRANSACTION.search(reply)
            if m is None:
                _abort(hook.socket, crt, replies, min(2.0, hook.timeout))
                hint = _size_hint(payload) if not reply.strip() else ""
                return finish(False, f"set ssl cert refused: {_one_line(reply)}{hint}")
            if _same_crt(m.group(1), crt):
                break
            # HAProxy 2.6 puts a new payload into whatever transaction is open, even one for
            # another certificate: that one now holds our certificate under another name, and
            # committing it would serve it there. Abort it; the other client will start over.
            log.warning("haproxy_transaction_clash socket=%s crt=%s other=%s: aborted", hook.socket, crt, m.group(1))
            _abort(hook.socket, m.group(1), replies, min(2.0, hook.timeout))
        else:
            return finish(False, "set ssl cert: another client kept HAProxy's certificate transaction busy")
        reply = haproxy_command(hook.socket, f"commit ssl cert {crt}\n".encode(), deadline)
        replies.append(reply)
        if "Success!" not in reply:
            _abort(hook.socket, crt, replies, min(2.0, hook.timeout))
            return finish(False, f"commit ssl cert refused: {_one_line(reply)}")
    except (OSError, TimeoutError) as e:
        _abort(hook.socket, crt, replies, min(2.0, hook.timeout))
        timed_out = isinstance(e, TimeoutError)
        why = (f"no answer within {hook.timeout:g}s on {hook.socket}" if timed_out
               else f"admin socket {hook.socket}: {e.strerror or e}")
        if timed_out:
            why += _size_hint(payload)
        return finish(False, why, timed_out)
    return finish(True)


HAPROXY_SET_ATTEMPTS = 3
HAPROXY_BUSY_RETRY = 0.05   # seconds between looks while another certificate's transaction is open
HAPROXY_STALE = 2.0         # a transaction open this long was abandoned (its client died): abort it
_TRANSACTION = re.compile(r"Transaction (?:created|updated) for certificate (.+?)!")
_ONGOING = re.compile(r"^# transaction\s*\n\*(.+)$", re.MULTILINE)


def _same_crt(a: str, b: str) -> bool:
    return os.path.normpath(a.strip()) == os.path.normpath(b.strip())


def _wait_for_turn(sock_path: Path, crt: str, deadline: float, replies: list[str]) -> None:
    """Wait while HAProxy has a transaction open for another certificate (HAProxy has one for
    all of them); abort it once it has stayed open :data:`HAPROXY_STALE` seconds, as one left
    by a client killed between ``set`` and ``commit`` would for ever."""
    since = time.monotonic()
    while True:
        m = _ONGOING.search(haproxy_command(sock_path, b"show ssl cert\n", deadline))
        if m is None or _same_crt(m.group(1), crt):
            return
        now = time.monotonic()
        if now - since >= HAPROXY_STALE or now + HAPROXY_BUSY_RETRY >= deadline:
            log.warning("haproxy_transaction_abandoned socket=%s other=%s: open for %.1fs, aborting it",
                        sock_path, m.group(1), now - since)
            _abort(sock_path, m.group(1).strip(), replies, 2.0)
            return
        time.sleep(HAPROXY_BUSY_RETRY)


def haproxy_command(sock_path: Path, request: bytes, deadline: float) -> str:
    """Send one runtime-API request and read the reply until HAProxy closes the connection
    (non-interactive mode: one command per connection). Raises OSError / TimeoutError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        s.connect(str(sock_path))
        s.sendall(request)
        chunks: list[bytes] = []
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _abort(sock_path: Path, crt: str, replies: list[str], timeout: float) -> None:
    """Close a pending transaction so the next ``set ssl cert`` starts clean; best effort."""
    try:
        replies.append(haproxy_command(sock_path, f"abort ssl cert {crt}\n".encode(),
                                       time.monotonic() + timeout))
    except OSError as e:
        replies.append(f"abort ssl cert failed: {e}")


def _size_hint(payload: bytes) -> str:
    """HAProxy stalls or hangs up without a word on a payload larger than its CLI buffer."""
    if len(payload) <= CLI_PAYLOAD_HINT:
        return ""
    return (f" (the {len(payload)}-byte certificate payload may exceed HAProxy's CLI buffer;"
            " raise tune.bufsize in haproxy.cfg)")


def _one_line(reply: str) -> str:
    return " ".join(line.strip() for line in reply.splitlines() if line.strip()) or "(empty reply)"


# --- process plumbing -----------------------------------------------------------------------


class _Output:
    """Keeps the first :data:`OUTPUT_HEAD` and last :data:`OUTPUT_TAIL` bytes of a stream."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = OUTPUT_HEAD - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > OUTPUT_TAIL:
            excess = len(self.tail) - OUTPUT_TAIL
            self.dropped += excess
            del self.tail[:excess]

    def text(self) -> str:
        mid = f"\n[... {self.dropped} bytes of output omitted ...]\n".encode() if self.dropped else b""
        return bytes(self.head + mid + self.tail).decode("utf-8", errors="replace").rstrip()


def _pump(proc: subprocess.Popen[bytes], out: _Output, deadline: float) -> bool:
    """Read output until the command exits or ``deadline``; False on timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    eof = False
    while True:
        remaining = deadline - time.monotonic()
        if eof:
            try:
                proc.wait(max(0.0, remaining))
                return True
            except subprocess.TimeoutExpired:
                return False
        if proc.poll() is not None:
            return True
        if remaining <= 0:
            return False
        # wake up now and then to notice an exit while a background child holds the pipe
        if _readable(fd, min(remaining, 0.05)):
            data = os.read(fd, 65536)
            if data:
                out.add(data)
            else:
                eof = True


def _drain(stream: object, out: _Output, deadline: float) -> None:
    """Read what is left in the pipe until EOF or ``deadline`` (a leftover child may hold it)."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    while (remaining := deadline - time.monotonic()) > 0:
        if not _readable(fd, remaining):
            return
        data = os.read(fd, 65536)
        if not data:
            return
        out.add(data)


def _readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): a busy daemon's descriptors may be numbered above 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _kill_group(proc: subprocess.Popen[bytes], out: _Output) -> None:
    """SIGTERM the command's process group, SIGKILL it after :data:`KILL_GRACE`, reap the
    command. The group id is the command's PID (``start_new_session``)."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        _drain(proc.stdout, out, min(deadline, time.monotonic() + 0.01))
        if proc.poll() is not None and not _group_alive(pgid):
            return
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    # kill() returns before the kernel has torn the processes down; give it a moment so that
    # "killed" means gone when we return (SIGKILL cannot be caught: this is bounded).
    settle = time.monotonic() + 0.5
    while _group_alive(pgid) and time.monotonic() < settle:
        _drain(proc.stdout, out, time.monotonic() + 0.005)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process is left in group ``pgid``.

    Zombies are skipped: orphaned grandchildren are reaped by PID 1, which in some containers
    never happens, and a zombie holds nothing open.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _failure(result: HookResult, is_process: bool) -> str:
    """``exit status 1: <last line>`` / ``timed out after 2.0s: <last line>``."""
    if result.timed_out:
        what = f"timed out after {result.duration:.1f}s" + (" (process group killed)" if is_process else "")
    elif result.returncode is not None:
        what = f"exited with status {result.returncode}" if result.returncode >= 0 else \
            f"killed by signal {-result.returncode}"
    else:
        what = "failed"
    last = _last_line(result.output)
    return f"{what}: {last}" if last else f"{what} (no output)"


def _last_line(output: str) -> str:
    for line in reversed(output.splitlines()):
        if line.strip() and not line.startswith("[... "):
            return line.strip()[:500]
    return ""
