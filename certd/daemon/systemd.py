"""What the daemon tells systemd (Type=notify): state lines, a STATUS= summary kept cheap with
thousands of certificates, and watchdog pings while the scheduler runs.

The summary's failing set (and the set waiting for the CA, which the CA probe reads) is built
from every certificate's state once, then kept current by each finished job
(:meth:`StateTracker.note`), so neither reads thousands of files again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from certd.config import Config
from certd.core.clock import Clock, isoformat
from certd.core.errors import CertdError
from certd.daemon.scheduler import Scheduler
from certd.engine.attempts import CertState

log = logging.getLogger("certd.daemon")

NOTIFY_TIMEOUT = 2.0     # seconds a STATUS= or WATCHDOG=1 line may wait for room in the notify socket
STATE_TIMEOUT = 30.0     # ... and READY=1 or STOPPING=1
STATUS_INTERVAL = 5.0    # seconds between systemd STATUS= lines (each one looks at every certificate)


def sd_notify(message: str) -> None:
    """Send a state line to systemd (Type=notify); a no-op outside systemd.

    Bounded: a receiver that stopped reading (its queue full) blocked a plain sendto for good,
    and STOPPING=1 then held the shutdown until systemd's SIGKILL. READY=1 and STOPPING=1 wait
    up to :data:`STATE_TIMEOUT` for room (systemd busy with a daemon-reload must not cost the
    start), STATUS= and WATCHDOG=1 lines :data:`NOTIFY_TIMEOUT`; a line not sent by then is
    dropped with a warning, like any other failure."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    timeout = STATE_TIMEOUT if message in ("READY=1", "STOPPING=1") else NOTIFY_TIMEOUT
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            # Connected, so that waiting for room polls the receiver's queue: an unconnected
            # datagram socket polls as always writable, and the timeout became a busy loop.
            s.settimeout(timeout)
            s.connect(addr)
            s.send(message.encode())
        except TimeoutError:
            log.warning("sd_notify failed: %s not sent: the notify socket stayed full for %g s", message, timeout)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)


def start_watchdog(scheduler: Scheduler, stop: threading.Event) -> None:
    """Ping systemd's watchdog (WATCHDOG_USEC) while the scheduler runs: a wedged scheduler
    stops the pings, and systemd restarts us."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    interval = usec / 1e6 / 2

    def ping() -> None:
        while not stop.wait(interval):
            if scheduler.running:
                sd_notify("WATCHDOG=1")
    threading.Thread(target=ping, name="watchdog", daemon=True).start()


class StateTracker:
    """Which certificates are failing, and which wait for the CA (their last failure was "CA
    not reachable"), plus the STATUS= line built from them."""

    def __init__(self, config: Callable[[], Config], load_state: Callable[[str], CertState],
                 scheduler: Scheduler, clock: Clock) -> None:
        self._config, self._load_state, self.scheduler, self.clock = config, load_state, scheduler, clock
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._sent = float("-inf")
        self._failing: set[str] = set()      # certificates whose last attempt failed (STATUS=)
        self._ca_waiting: set[str] = set()   # ... because the CA was unreachable (the CA probe)
        self.scanned = False                 # both sets hold every certificate's state

    def scan(self) -> None:
        """Read every certificate's state once."""
        for cert in self._config().certificates:
            self.note(cert.name)
        with self._lock:
            self.scanned = True

    def forget_scan(self) -> None:
        """Names came or went (a config reload): the next CA probe scans again."""
        self.scanned = False

    def note(self, name: str) -> None:
        """Keep the failing and waiting-for-the-CA sets current after a job on ``name``."""
        try:
            state = self._load_state(name)
        except CertdError:
            return
        with self._lock:
            for bucket, member in ((self._failing, state.failures > 0), (self._ca_waiting, state.ca_unreachable)):
                if member:
                    bucket.add(name)
                else:
                    bucket.discard(name)

    def ca_waiting(self) -> set[str]:
        """The certificates waiting out a backoff because the CA was unreachable."""
        if not self.scanned:
            self.scan()
        with self._lock:
            return set(self._ca_waiting)

    def update(self) -> None:
        """Send systemd a STATUS= summary soon, at most one every STATUS_INTERVAL seconds: with
        thousands of certificates, a summary after every finished job cost more than the jobs."""
        with self._lock:
            if self._timer is not None:
                return  # one is due already and will see this change too
            delay = max(0.0, self._sent + STATUS_INTERVAL - self.clock.monotonic())
            self._timer = threading.Timer(delay, self._send)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    def _send(self) -> None:
        with self._lock:
            self._timer = None
            first, self._sent = self._sent == float("-inf"), self.clock.monotonic()
        if first:
            self.scan()
        names = set(self._config().names)
        with self._lock:
            failing = len(self._failing & names)
        upcoming = self.scheduler.next_scheduled()
        line = f"{len(names)} certificates"
        if upcoming:
            line += f"; next: {upcoming[1]} at {isoformat(upcoming[0])}"
        if failing:
            line += f"; {failing} failing"
        sd_notify(f"STATUS={line}")
