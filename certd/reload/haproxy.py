"""The HAProxy reload hook: the runtime API on the admin socket, no reload at all (``set ssl
cert`` with fullchain + key, then ``commit ssl cert``; see certd/reload/hooks.py). HAProxy keeps one
certificate transaction for all its certificates, so updates take turns.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from certd.config import ReloadHook
from certd.core.clock import Clock
from certd.reload.command import HookResult
from certd.core.model import Bundle

log = logging.getLogger("certd.hooks")

#: Above this payload size a silent HAProxy is probably stuck on its CLI buffer (tune.bufsize,
#: 16384 by default: a 23 kB payload hangs, 13.7 kB works on HAProxy 2.6).
CLI_PAYLOAD_HINT = 14 * 1024


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _haproxy_lock(sock: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(sock), threading.Lock())


def hotswap(hook: ReloadHook, bundle: Bundle, clock: Clock) -> HookResult:
    """Hand HAProxy ``bundle`` for ``hook.crt``; the next handshake serves it. ``hook.timeout``
    and the result's duration are measured on ``clock``."""
    start = clock.monotonic()
    deadline = start + hook.timeout
    if hook.socket is None or not hook.crt:
        return HookResult("haproxy", False, None, 0.0, "haproxy hook needs socket and crt")
    crt = hook.crt
    replies: list[str] = []

    def finish(ok: bool, why: str | None = None, timed_out: bool = False) -> HookResult:
        text = "\n".join(r.strip() for r in replies if r.strip())
        if why:
            text = f"{text}\n{why}" if text else why
        return HookResult("haproxy", ok, None, clock.monotonic() - start, text, timed_out)

    # HAProxy keeps one certificate transaction for all its certificates: updates of several
    # certificates on the same HAProxy take turns here, and another client's turn is waited out.
    lock = _haproxy_lock(hook.socket)
    # Real time: a Lock's timeout is the interpreter's own wait (the holder runs in real time,
    # talking to a real HAProxy), not something a clock could move.
    if not lock.acquire(timeout=hook.timeout):
        return finish(False, f"another update on {hook.socket} did not finish within {hook.timeout:g}s", True)
    try:
        return _hotswap_haproxy_locked(hook, bundle, crt, deadline, replies, finish, clock)
    finally:
        lock.release()


def _hotswap_haproxy_locked(hook: ReloadHook, bundle: Bundle, crt: str, deadline: float, replies: list[str],
                            finish: Callable[..., HookResult], clock: Clock) -> HookResult:
    assert hook.socket is not None
    # The payload ends at the first empty line: the PEM must not contain one.
    payload = b"\n".join(line for line in bundle.combined_pem.splitlines() if line.strip())
    try:
        for _attempt in range(HAPROXY_SET_ATTEMPTS):
            _wait_for_turn(hook.socket, crt, deadline, replies, clock)
            reply = haproxy_command(hook.socket, f"set ssl cert {crt} <<\n".encode() + payload + b"\n\n",
                                    deadline, clock)
            replies.append(reply)
            m = _TRANSACTION.search(reply)
            if m is None:
                _abort(hook.socket, crt, replies, min(2.0, hook.timeout), clock)
                hint = _size_hint(payload) if not reply.strip() else ""
                return finish(False, f"set ssl cert refused: {_one_line(reply)}{hint}")
            if _same_crt(m.group(1), crt):
                break
            # HAProxy 2.6 puts a new payload into whatever transaction is open, even one for
            # another certificate: that one now holds our certificate under another name, and
            # committing it would serve it there. Abort it; the other client will start over.
            log.warning("haproxy_transaction_clash socket=%s crt=%s other=%s: aborted", hook.socket, crt, m.group(1))
            _abort(hook.socket, m.group(1), replies, min(2.0, hook.timeout), clock)
        else:
            return finish(False, "set ssl cert: another client kept HAProxy's certificate transaction busy")
        reply = haproxy_command(hook.socket, f"commit ssl cert {crt}\n".encode(), deadline, clock)
        replies.append(reply)
        if "Success!" not in reply:
            _abort(hook.socket, crt, replies, min(2.0, hook.timeout), clock)
            return finish(False, f"commit ssl cert refused: {_one_line(reply)}")
    except (OSError, TimeoutError) as e:
        _abort(hook.socket, crt, replies, min(2.0, hook.timeout), clock)
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


def _wait_for_turn(sock_path: Path, crt: str, deadline: float, replies: list[str], clock: Clock) -> None:
    """Wait while HAProxy has a transaction open for another certificate (HAProxy has one for
    all of them); abort it once it has stayed open :data:`HAPROXY_STALE` seconds, as one left
    by a client killed between ``set`` and ``commit`` would for ever."""
    since = clock.monotonic()
    while True:
        m = _ONGOING.search(haproxy_command(sock_path, b"show ssl cert\n", deadline, clock))
        if m is None or _same_crt(m.group(1), crt):
            return
        now = clock.monotonic()
        if now - since >= HAPROXY_STALE or now + HAPROXY_BUSY_RETRY >= deadline:
            log.warning("haproxy_transaction_abandoned socket=%s other=%s: open for %.1fs, aborting it",
                        sock_path, m.group(1), now - since)
            _abort(sock_path, m.group(1).strip(), replies, 2.0, clock)
            return
        clock.sleep(HAPROXY_BUSY_RETRY)


def haproxy_command(sock_path: Path, request: bytes, deadline: float, clock: Clock) -> str:
    """Send one runtime-API request and read the reply until HAProxy closes the connection
    (non-interactive mode: one command per connection), by ``deadline`` on ``clock``. Raises
    OSError / TimeoutError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        # The time left is handed to the kernel as each socket operation's timeout.
        s.settimeout(max(0.001, deadline - clock.monotonic()))
        s.connect(str(sock_path))
        s.sendall(request)
        chunks: list[bytes] = []
        while True:
            s.settimeout(max(0.001, deadline - clock.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _abort(sock_path: Path, crt: str, replies: list[str], timeout: float, clock: Clock) -> None:
    """Close a pending transaction so the next ``set ssl cert`` starts clean; best effort."""
    try:
        replies.append(haproxy_command(sock_path, f"abort ssl cert {crt}\n".encode(),
                                       clock.monotonic() + timeout, clock))
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
