"""Reload hooks: make the servers pick up the certificate the deploy step just switched to.

Three kinds, one contract: :func:`run_reload` returns a :class:`HookResult` when the server
accepted the new certificate and raises :class:`~certd.core.errors.HookFailed` (one line: which
hook, exit code or timeout, the line of output that says why) when it did not. Whether the
new certificate is actually *served* is not decided here: ``certd.verify.handshake`` checks that with a
real handshake, because a reload that "succeeded" proves little. This module dispatches; each
kind lives in its own (nginx.py, haproxy.py, command.py).

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
  Certificates sharing one nginx take turns with it (:class:`certd.reload.nginx.NginxGate`): no deploy switch
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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from certd.reload import haproxy as hooks_haproxy
from certd.reload import nginx as hooks_nginx
from certd.config import ReloadHook
from certd.core.clock import Clock, SystemClock
from certd.core.errors import HookFailed
from certd.reload.command import DEFAULT_PATH, HookResult, run_command
from certd.ops.log import redact
from certd.core.model import Bundle

log = logging.getLogger("certd.hooks")  # a stable name: it is part of the log format


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the rotation it is part of."""

    name: str                   # the certificate's name in the config
    domains: tuple[str, ...]
    version: int                # the store version now deployed
    bundle: Bundle
    live_dir: Path | None       # [certificate.deploy] live_dir, if configured
    combined: Path | None       # [certificate.deploy] combined, if configured


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


def run_reload(hook: ReloadHook, ctx: HookContext, clock: Clock | None = None) -> HookResult:
    """Run one reload hook; raise :class:`HookFailed` unless the server took the change.

    The nginx and HAProxy hooks wait (for their turn, for old workers, for HAProxy's
    transaction) on ``clock`` (default: the system clock). A command hook's timeout is real
    time (see :func:`certd.reload.command.run_command`)."""
    clock = clock or SystemClock()
    if hook.kind == "nginx":
        result = hooks_nginx.reload(hook, ctx.name, clock)
    elif hook.kind == "haproxy":
        result = hooks_haproxy.hotswap(hook, ctx.bundle, clock)
    elif hook.kind == "command":
        result = run_command(hook.command, env=hook_env(ctx), timeout=hook.timeout, caps=hook.capabilities)
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


@contextmanager
def switching(hooks: Sequence[ReloadHook], name: str) -> Iterator[None]:
    """Run the deploy switch of certificate ``name`` in this block: it waits while an nginx among
    ``hooks`` reads its certificates, and lets that nginx's hook know of the switch."""
    gates = [hooks_nginx.gate(c) for c in sorted({h.config for h in hooks if h.kind == "nginx"}, key=str)]
    with ExitStack() as stack:
        for gate in gates:
            stack.enter_context(gate.switch(name))
        yield


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
