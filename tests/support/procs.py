"""Generic helpers for tests that run real processes on loopback.

Three rules every fixture follows, and these helpers make easy:

- **Ports** come from :func:`free_port` (the kernel picks an unused loopback port).
- **Synchronisation** is polling with a deadline (:func:`wait_until`), never a fixed sleep:
  the fast case stays fast and the slow case fails with a message that says what it was
  waiting for.
- **Processes** are started and stopped through :class:`ManagedProcess`, which only ever
  signals the PID it started itself, reaps it, and keeps its output in a log file so a
  failure can show the tail of that log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = [
    "ManagedProcess",
    "ProcessFailed",
    "WaitTimeout",
    "free_port",
    "wait_until",
]

T = TypeVar("T")

#: How much of a log :meth:`ManagedProcess.log_tail` shows by default.
LOG_TAIL_LINES = 40


class WaitTimeout(TimeoutError, AssertionError):
    """A :func:`wait_until` deadline passed.

    Both a ``TimeoutError`` (it is one) and an ``AssertionError`` (so pytest reports it as a
    failed expectation, with the message, not as an internal error).
    """


class ProcessFailed(RuntimeError):
    """A managed process exited or never became ready; the message ends with its log tail."""


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """Return a port on ``host`` that nothing is bound to right now.

    The kernel picks it (bind to port 0). There is a small window before the caller binds it;
    fixtures that start a server on it should treat "address in use" as retryable.
    ``kind=socket.SOCK_DGRAM`` asks for a free UDP port instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_tcp_udp_port(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """Return a port free for both TCP and UDP on ``host`` (DNS servers listen on both)."""
    for _ in range(attempts):
        port = free_port(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                udp.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host} after {attempts} tries")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy; return that value.

    Raises :class:`WaitTimeout` naming ``what`` once ``timeout`` seconds have passed.
    Exceptions listed in ``ignore`` (e.g. ``(OSError,)`` while a server starts) count as
    "not yet"; the last one is quoted in the timeout message. The predicate is always called
    at least once, and once more at the deadline, so a tiny timeout cannot fail spuriously
    on a condition that already holds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        expired = time.monotonic() >= deadline
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if expired:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _die_with_parent() -> None:
    """``preexec_fn``: ask Linux to SIGTERM the child when the process that started it dies.

    This keeps a crashed or SIGKILLed pytest from leaving servers behind. Linux ties the
    signal to the *thread* that forked, so only start long-lived processes from the main
    thread (fixtures do) or pass ``die_with_parent=False``.
    """
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class ManagedProcess:
    """One child process, started from ``argv``, with its output in ``log_path``.

    Only the PID this object started is ever signalled. ``start()`` may be called again after
    the process has stopped (the log is appended to, with a marker line).
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        inherit_env: bool = True,
        die_with_parent: bool = True,
    ) -> None:
        """Describe the process; nothing runs until :meth:`start`.

        ``env`` is added to a copy of ``os.environ`` (or replaces it if ``inherit_env`` is
        false). ``name`` is used in messages (default: the program's base name).
        """
        self.argv: list[str] = [os.fspath(a) for a in argv]
        self.log_path = Path(log_path)
        self.env: dict[str, str] = dict(os.environ) if inherit_env else {}
        self.env.update(env or {})
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.die_with_parent = die_with_parent
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.alive else "stopped"
        return f"<ManagedProcess {self.name} {state}>"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        """Start the process (stdin closed, stdout+stderr to the log). Returns ``self``."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        return self

    def wait_ready(
        self,
        predicate: Callable[[], T],
        timeout: float,
        what: str,
        ignore: tuple[type[BaseException], ...] = (OSError,),
    ) -> T:
        """Poll ``predicate`` like :func:`wait_until`, but fail at once if the process exits.

        On failure the process is killed (if still running) and :class:`ProcessFailed` is
        raised with the tail of its log.
        """

        def ready_or_dead() -> T:
            if not self.alive:
                raise ProcessFailed(self._failure_message(f"exited before {what}"))
            return predicate()

        try:
            return wait_until(ready_or_dead, timeout, what=f"{self.name}: {what}", ignore=ignore)
        except WaitTimeout as exc:
            self.kill()
            raise ProcessFailed(self._failure_message(str(exc))) from None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the PID, SIGKILL it if it is still there after ``timeout`` s, and reap it.

        Returns the exit status (``None`` if it was never started). Safe to call twice.
        """
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        return self._popen.wait()

    def kill(self) -> int | None:
        """SIGKILL the PID at once and reap it (a crash, as far as peers can tell)."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal(signal.SIGKILL)
        return self._popen.wait()

    def _signal(self, signum: int) -> None:
        assert self._popen is not None
        # It may have exited between poll() and kill(); wait() reaps it either way.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._popen.pid, signum)

    # -- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the last started process (``None`` before the first start)."""
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        """True while the started process has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited, else ``None``."""
        return self._popen.poll() if self._popen is not None else None

    def log_text(self) -> str:
        """Everything the process has written so far (all starts), decoded leniently."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of :meth:`log_text`."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _failure_message(self, what: str) -> str:
        status = "running" if self.alive else f"exit status {self.returncode}"
        return (
            f"{self.name} (pid {self.pid}, {status}): {what}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )
