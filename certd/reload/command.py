"""Run a hook's command: an argv without a shell, with exactly the environment given, stdin
from /dev/null, in its own session. On timeout the whole process group gets SIGTERM, then
SIGKILL after a short grace, so a hook's grandchildren cannot outlive it and certd gets
control back promptly. The output (stdout+stderr) is kept as its head and its tail: the tail
says why a command failed.

This module reads ``time.monotonic()`` itself, not an injected Clock: every deadline here
becomes a timeout handed to the kernel (``poll()`` on the pipe, ``waitpid``) while a real
process runs in real time; a fake clock could neither hurry it nor bound it.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from certd.core import capabilities

#: Output kept per hook run: the head and the tail (the tail says why it failed).
OUTPUT_HEAD = 4 * 1024
OUTPUT_TAIL = 28 * 1024
#: After SIGTERM on timeout, how long the process group gets before SIGKILL.
KILL_GRACE = 1.0
#: After the hook itself exited, how long to keep reading output that a leftover background
#: child might still hold open (we do not wait for such children).
DRAIN_AFTER_EXIT = 0.05
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class HookResult:
    hook: str                   # which hook, as an operator would recognise it
    ok: bool
    returncode: int | None      # None: timed out, could not start, or not a process (haproxy)
    duration: float             # seconds
    output: str                 # stdout+stderr (or the runtime API's replies), truncated
    timed_out: bool = False


def run_command(argv: Sequence[str], *, env: Mapping[str, str], timeout: float,
                caps: Sequence[str] = ()) -> HookResult:
    """Run ``argv`` (no shell) with exactly ``env``; never raises for what the command does.

    ``ok`` is true only for exit status 0 within ``timeout``. On timeout the process group is
    killed (SIGTERM, SIGKILL after :data:`KILL_GRACE`) and the command reaped. The command
    holds at most the capabilities in ``caps`` (see certd/core/capabilities.py).
    """
    label = argv[0] if argv else "<empty command>"
    start = time.monotonic()  # real time: see the module docstring
    try:
        if not argv:
            raise ValueError("empty command")
        program = find_program(argv[0], env)
        proc = subprocess.Popen(capabilities.limited([program, *argv[1:]], caps), env=dict(env),
                                stdin=subprocess.DEVNULL,
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


def find_program(program: str, env: Mapping[str, str]) -> str:
    """The executable ``program`` names (found on the hook's PATH if it has no slash); OSError
    (ENOENT, EACCES) as exec would say, checked here because setpriv does the exec."""
    if "/" not in program:
        found = shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return found
    if not os.path.exists(program):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    return program


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
