"""Webhook notifications: a JSON POST for every event an operator must hear about.

Sent for ``renewal_failed``, ``rolled_back``, ``rollback_failed``, ``drift_found`` and
``expiring_soon``. A renewal that failed *and was rolled back* is one notification (the
``rolled_back`` or ``rollback_failed`` one, which carries the error), not two.

Contract:

- **Never in the rotation's way.** :meth:`Alerter.on_event` only queues (a bounded queue; when
  it is full the newest notification is dropped and logged). One background thread delivers,
  so a webhook that is slow or down delays nothing but other notifications.
- **Bounded retries.** Up to :data:`ATTEMPTS` tries, ``timeout`` each, waiting 1 s, 2 s, 4 s
  (plus up to 10 % jitter) in between; a 429/503 ``Retry-After`` is honoured up to
  :data:`MAX_RETRY_AFTER`. Connection errors, timeouts, 408, 429 and 5xx are retried; any other
  answer is final (a 401 will not fix itself) and logged with what to check.
- **No key material.** The payload has kind, name, time, serials, version, notAfter, the
  reason/error, severity and host name; the bearer token goes in the ``Authorization`` header
  only and never into a log line. ``bearer_token_file`` is read at every delivery, so rotating
  the token needs no restart.
- **Short-lived processes** (the in-process CLI) wait up to :data:`EXIT_FLUSH` seconds at exit
  for queued notifications, so a failed ``certd renew`` from cron is still reported.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import random
import socket
import threading
from typing import TYPE_CHECKING, Any

from certd import __version__
from certd.core.clock import Clock, isoformat
from certd.core.retry_after import retry_after_seconds
from certd.config import AlertsConfig
from certd.core.events import LifecycleEvent
from certd.ops.log import event

if TYPE_CHECKING:  # httpx is imported where a notification is sent: ~0.08 s that `certd status` never needs
    import httpx

log = logging.getLogger("certd.alerts")

ATTEMPTS = 4
BACKOFF_BASE = 1.0
MAX_RETRY_AFTER = 30.0
QUEUE_SIZE = 1000
EXIT_FLUSH = 10.0

SEVERITY = {
    "renewal_failed": "warning",
    "rolled_back": "warning",
    "drift_found": "warning",
    "rollback_failed": "critical",
    "expiring_soon": "critical",
    "release_aborted": "critical",
    "release_rolled_back": "critical",
    "node_switch_back_refused": "critical",
}


class Alerter:
    """The ``[alerts]`` webhook sink. Thread-safe; the delivery thread starts on first use."""

    def __init__(self, config: AlertsConfig | None, clock: Clock, *, host: str | None = None,
                 backoff_base: float = BACKOFF_BASE) -> None:
        self.config = config
        self.clock = clock
        self.host = host or socket.gethostname()
        self.backoff_base = backoff_base
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._rng = random.Random()
        atexit.register(self.close, EXIT_FLUSH)

    def reconfigure(self, config: AlertsConfig | None) -> None:
        """Deliver to the new settings from the next notification on."""
        self.config = config

    # -- the sink ---------------------------------------------------------------------------

    def on_event(self, ev: LifecycleEvent) -> None:
        """EventBus sink: queue a notification if ``ev`` deserves one; never blocks."""
        if self.config is None or self._closed.is_set() or ev.kind not in SEVERITY:
            return
        if ev.kind == "renewal_failed" and ev.outcome in ("rolled_back", "rollback_failed"):
            return  # the rollback notification already told this story
        try:
            self._queue.put_nowait(payload(ev, self.host))
        except queue.Full:
            event(log, "alert_dropped", logging.ERROR, kind=ev.kind, name=ev.name,
                  reason=f"{QUEUE_SIZE} notifications are already waiting; is the webhook down?")
            return
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking notifications; wait up to ``timeout`` s for the queued ones. True if all
        were handled (delivered or given up)."""
        self._closed.set()
        thread = self._thread
        if thread is None or self._queue.unfinished_tasks == 0:
            return True
        for _ in range(max(1, round(timeout / 0.05))):  # real time: the clock may be a test's fake
            if not self._queue.unfinished_tasks or not thread.is_alive():
                break
            thread.join(0.05)
        if self._queue.unfinished_tasks:
            event(log, "alerts_abandoned", logging.WARNING, pending=self._queue.unfinished_tasks)
            return False
        return True

    # -- delivery ---------------------------------------------------------------------------

    def _run(self) -> None:
        import httpx
        with httpx.Client(follow_redirects=False) as client:
            while True:
                try:
                    body = self._queue.get(timeout=1.0)
                except queue.Empty:
                    if self._closed.is_set():
                        return
                    continue
                try:
                    self._deliver(client, body)
                except Exception:  # noqa: BLE001 - never let one notification kill the thread
                    log.exception("alert delivery crashed for %s %s", body.get("kind"), body.get("name"))
                finally:
                    self._queue.task_done()

    def _deliver(self, client: httpx.Client, body: dict[str, Any]) -> bool:
        """POST ``body`` with retries; True once the webhook answered 2xx."""
        import httpx
        config = self.config
        if config is None:
            return False
        what = {"kind": body["kind"], "name": body["name"]}
        why = ""
        for attempt in range(1, ATTEMPTS + 1):
            retry_after: float | None = None
            try:
                headers = {"User-Agent": f"certd/{__version__}", **_auth(config)}
                r = client.post(config.webhook_url, content=json.dumps(body, default=str).encode(),
                                headers={"Content-Type": "application/json", **headers}, timeout=config.timeout)
            except OSError as e:  # the token file could not be read
                why, retryable = f"cannot read bearer_token_file: {e.strerror or e}", True
            except httpx.HTTPError as e:
                why, retryable = _transport_error(e, config.timeout), True
            else:
                if 200 <= r.status_code < 300:
                    event(log, "alert_sent", status=r.status_code, attempt=attempt, **what)
                    return True
                why = f"HTTP {r.status_code}{_hint(r.status_code)}"
                retryable = r.status_code in (408, 429) or r.status_code >= 500
                retry_after = retry_after_seconds(r.headers.get("Retry-After"), self.clock.now())
            if not retryable or attempt == ATTEMPTS:
                break
            delay = self.backoff_base * 2 ** (attempt - 1) * (1 + self._rng.uniform(0, 0.1))
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
            event(log, "alert_retry", logging.WARNING, attempt=attempt, error=why, wait=f"{delay:.1f}s", **what)
            self.clock.sleep(delay)
        event(log, "alert_failed", logging.ERROR, url=_safe_url(config.webhook_url), attempts=attempt, error=why,
              **what)
        return False


def payload(ev: LifecycleEvent, host: str) -> dict[str, Any]:
    """The JSON body for ``ev``: stable keys, no key material."""
    detail = ev.detail if isinstance(ev.detail, dict) else {}
    error = detail.get("error") or (ev.reason if ev.kind == "renewal_failed" else None)
    if ev.kind == "rollback_failed" and detail.get("rollback_error"):
        error = f"{error}; rollback: {detail['rollback_error']}"
    return {
        "source": "certd", "certd_version": __version__,
        "kind": ev.kind, "severity": SEVERITY.get(ev.kind, "info"), "name": ev.name, "host": host,
        "time": isoformat(ev.time), "summary": _summary(ev, error),
        "reason": ev.reason or None, "error": error, "outcome": ev.outcome, "initiator": ev.initiator,
        "old_serial": ev.old_serial, "new_serial": ev.new_serial, "version": ev.version,
        "not_after": isoformat(ev.not_after), "detail": detail,
    }


def _summary(ev: LifecycleEvent, error: str | None) -> str:
    n = ev.name
    if ev.kind == "renewal_failed":
        return f"{n}: renewal failed ({ev.outcome}): {error}"
    if ev.kind == "rolled_back":
        return f"{n}: rotation failed and was rolled back; serial {ev.new_serial} is served again (verified): {error}"
    if ev.kind == "rollback_failed":
        return f"{n}: ROLLBACK FAILED, check the endpoints now: {error}"
    if ev.kind == "drift_found":
        lines = ev.detail.get("mismatches", []) if isinstance(ev.detail, dict) else []
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        return f"{lines[0] if lines else n + ': drift found'}{more}"
    if ev.kind == "expiring_soon":
        return (f"{n}: certificate {ev.old_serial} expires {isoformat(ev.not_after)} "
                f"and has not been renewed: {ev.reason}")
    return f"{n}: {ev.kind}"


def _auth(config: AlertsConfig) -> dict[str, str]:
    token = config.bearer_token
    if config.bearer_token_file is not None:
        token = config.bearer_token_file.read_text("utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _transport_error(e: httpx.HTTPError, timeout: float) -> str:
    import httpx
    if isinstance(e, httpx.TimeoutException):
        return f"no answer within {timeout:g}s"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect: {e}"
    return f"{type(e).__name__}: {e}"


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check [alerts] bearer_token / bearer_token_file)"
    if status == 404:
        return " (check [alerts] webhook_url)"
    return ""


def _safe_url(url: str) -> str:
    """Scheme, host and port only: webhook paths and queries often hold a secret (Slack's do)."""
    import httpx
    try:
        u = httpx.URL(url)
        return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")
    except Exception:  # noqa: BLE001
        return "<webhook_url>"
