"""The daemon's watch between rotations (``certd run`` only): drift and approaching expiry.

- **Drift reconcile.** Every ``[daemon] drift_interval`` (default 5 min) each certificate is
  checked with :func:`certd.verify.drift.check`. An out-of-band change to a deployed file (watchdog,
  i.e. inotify: content, mode, owner, a replaced link) triggers a check of that certificate
  :data:`DEBOUNCE` seconds after the last change. Reads do not count (nginx reloading, or the
  check itself, open the files). Every check sets the ``certd_drift`` gauge; a *new* set of
  mismatches is logged and emitted as ``drift_found`` (once per change, not at every interval).
- **Repair.** Where enabled (:func:`certd.verify.drift.repair_enabled`) and the drift is repairable,
  :meth:`~certd.engine.manager.Manager.redeploy` puts the current version back (in the worker pool,
  under the certificate's lock), and ``drift_repaired`` is emitted once a fresh check is clean.
  A failed repair is tried again at the next periodic check only, not at every file event (its
  own writes would make one), so a server that keeps serving something else is not reloaded in
  a loop.
- **expiring_soon.** When a certificate passes the emergency point
  (:func:`certd.core.policy.is_expiring_soon`: a tenth of its lifetime left) without a successful
  renewal, ``expiring_soon`` is emitted once for that serial; the serial is kept in the
  certificate's state, so a restart does not repeat it. The loop wakes at the next such instant.

Certificates with a rotation in flight are skipped and looked at again :data:`BUSY_RETRY` later.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from certd.verify import drift
from certd.core import policy
from certd.core.clock import Clock, isoformat
from certd.config import CertificateConfig, Config
from certd.core.errors import CertdError, LockBusy, OperationFailed
from certd.ops.log import event
from certd.engine.manager import Manager
from certd.ops.metrics import Metrics
from certd.core.model import CertInfo

log = logging.getLogger("certd.monitor")

DEBOUNCE = 0.5
BUSY_RETRY = 2.0
#: drift_checked names at most this many certificates (the rest are counted)
LOGGED_NAMES = 20
#: Event types that mean a file changed (not "opened" / "closed_no_write": reads).
CHANGES = frozenset({"created", "deleted", "modified", "moved", "closed", "attrib"})


class Monitor:
    """Drift reconcile + expiring_soon for the daemon; one thread, plus repairs in the pool."""

    def __init__(self, manager: Manager, config: Callable[[], Config], *, busy: Callable[[str], bool],
                 submit: Callable[..., None], metrics: Metrics | None, clock: Clock) -> None:
        """``busy(name)``: a rotation of ``name`` is in flight. ``submit(fn, *args, job_id=...)``
        runs ``fn`` in the daemon's worker pool."""
        self.manager, self._config, self._busy, self._submit = manager, config, busy, submit
        self.metrics, self.clock = metrics, clock
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._due: dict[str, float] = {}                 # name -> monotonic time of a requested check
        self._next_full = 0.0                             # monotonic time of the next periodic check
        self._last: dict[str, tuple[str, ...]] = {}      # name -> mismatches last reported
        self._repairing: set[str] = set()
        self._repair_failed: set[str] = set()            # cleared at every periodic check
        self._expiry_noted: dict[str, str] = {}          # name -> serial already reported
        self._infos: dict[tuple[str, int], CertInfo] = {}
        self._observer: Any = None
        self._watches: dict[tuple[str, bool], Any] = {}
        self._owners: _Owners | None = None              # which certificate a deployed path is
        self._thread: threading.Thread | None = None
        #: [cluster]: the store probe's verdict (storehealth); drift is not checked while False
        self.store_up: Callable[[], bool] = lambda: True
        self._skipping = False                            # "drift check skipped" said once per outage

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def reconfigure(self) -> None:
        """The configuration changed: check everything (and watch the new paths) now."""
        with self._lock:
            self._next_full = 0.0
        self._wake.set()

    def request(self, name: str, delay: float = DEBOUNCE) -> None:
        """Check ``name`` ``delay`` seconds from now (a later request pushes it back: debounce)."""
        with self._lock:
            self._due[name] = self.clock.monotonic() + delay
        self._wake.set()

    def check_now(self, names: Iterable[str] | None = None) -> list[drift.CertDrift]:
        """A check on demand (``certd drift`` through the daemon): gauges and events follow it.
        While the fleet's database is down: OperationFailed (nothing can be compared)."""
        if not self.store_up():
            raise OperationFailed("drift not checked: the fleet database is unreachable from this node; "
                                  "it is checked again when the database is back")
        results = drift.check_all(self._config(), self.manager.store, names)
        for r in results:
            if r.configured:
                self._record(r)
        return results

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._tick()
            except Exception:  # noqa: BLE001 - the watch must outlive a bug in one round
                log.exception("monitor round failed")
                wait = BUSY_RETRY
            self._wake.wait(max(0.01, wait))
            self._wake.clear()

    def _tick(self) -> float:
        """One round; returns the seconds until the next one is due."""
        cfg = self._config()
        now = self.clock.monotonic()
        with self._lock:
            full = now >= self._next_full
            if full:
                self._next_full = now + cfg.daemon.drift_interval
                self._due.clear()
                self._repair_failed.clear()
                names = set(cfg.names)
            else:
                names = {n for n, t in self._due.items() if t <= now}
                for n in names:
                    del self._due[n]
        self._sync_watches(cfg)
        if names:
            self._reconcile(cfg, names, full)
        next_expiry = self.check_expiring(cfg)
        with self._lock:
            deadlines = [self._next_full, *self._due.values()]
        if next_expiry is not None:
            deadlines.append(self.clock.monotonic() + next_expiry)
        return min(deadlines) - self.clock.monotonic()

    def _reconcile(self, cfg: Config, names: set[str], full: bool) -> None:
        if not self.store_up():  # an unreachable store is not a drift: look again when it is back
            if not self._skipping:
                self._skipping = True
                event(log, "drift_check_skipped", logging.WARNING, names=",".join(sorted(names)),
                      why="the fleet database is unreachable; checked again when it is back")
            return
        self._skipping = False
        ready = []
        for name in sorted(names):
            with self._lock:
                repairing = name in self._repairing
            if repairing or self._busy(name):
                self.request(name, BUSY_RETRY)
            else:
                ready.append(name)
        results = drift.check_all(cfg, self.manager.store, ready) if ready else []
        for r in results:
            self._record(r)
            cert = cfg.certificate(r.name)
            with self._lock:
                wanted = (r.repairable and drift.repair_enabled(cfg, cert)
                          and r.name not in self._repair_failed and r.name not in self._repairing)
                if wanted:
                    self._repairing.add(r.name)
            if wanted:
                self._submit(self._repair, cert, r, job_id=f"repair:{r.name}")
        if results:
            # The names while they fit a log line (a start-up check of 100,000 certificates named
            # them in one 1.5 MB line); then how many. A certificate is named by drift_found when
            # its mismatches change, and certd drift / GET /v1/drift list every one.
            shown = ",".join(r.name for r in results[:LOGGED_NAMES]) + (",..." if len(results) > LOGGED_NAMES else "")
            event(log, "drift_checked", names=shown, certificates=len(results),
                  drift=sum(1 for r in results if not r.clean), periodic=full)

    def _record(self, r: drift.CertDrift) -> None:
        """Gauge, log and ``drift_found`` for one check (events only when the mismatches change)."""
        if r.note is not None:  # not checked: leave what we knew
            return
        if self.metrics is not None:
            self.metrics.set_drift(r.name, r.kind_counts())
        msgs = tuple(m.message for m in r.mismatches)
        with self._lock:
            before = self._last.get(r.name, ())
            self._last[r.name] = msgs
        if msgs and set(msgs) != set(before):
            cfg = self._config()
            repair = r.name in cfg.names and drift.repair_enabled(cfg, cfg.certificate(r.name))
            for m in r.mismatches:
                if m.message not in before:
                    event(log, "drift_found", logging.WARNING, name=r.name, kind=m.kind, mismatch=m.message)
            self.manager.emit("drift_found", r.name, outcome="found", version=r.version, new_serial=r.serial,
                              reason=f"{len(msgs)} mismatch{'es' if len(msgs) != 1 else ''} between configured, "
                                     f"stored, deployed and served",
                              detail={"mismatches": list(msgs),
                                      "kinds": {k: n for k, n in r.kind_counts().items() if n},
                                      "repair": repair})
        elif before and not msgs:
            event(log, "drift_cleared", name=r.name, version=r.version)

    def _repair(self, cert: CertificateConfig, before: drift.CertDrift) -> None:
        """Worker-pool job: redeploy the current version, check again, report."""
        try:
            event(log, "drift_repair_started", name=cert.name, mismatches=len(before.mismatches))
            outcome = self.manager.redeploy(cert)
            after = drift.check(cert, self.manager.store)
            self._record(after)
            if outcome.ok and after.clean:
                event(log, "drift_repaired", name=cert.name, version=outcome.version, serial=outcome.serial)
                self.manager.emit("drift_repaired", cert.name, initiator="drift", outcome="repaired",
                                  reason=outcome.message, version=outcome.version, new_serial=outcome.serial,
                                  detail={"repaired": [m.message for m in before.mismatches]})
                return
            with self._lock:
                self._repair_failed.add(cert.name)
            why = outcome.message if not outcome.ok else "; ".join(m.message for m in after.mismatches)
            event(log, "drift_repair_failed", logging.ERROR, name=cert.name, error=why,
                  retry="at the next periodic drift check")
        finally:
            with self._lock:
                self._repairing.discard(cert.name)

    # -- expiring_soon --------------------------------------------------------------------------

    def check_expiring(self, cfg: Config) -> float | None:
        """Emit ``expiring_soon`` where due; seconds until the next certificate reaches it."""
        now = self.clock.now()
        soonest: datetime | None = None
        for cert in cfg.certificates:
            try:
                current = self.manager.store.current(cert.name)
                if current is None:
                    continue
                info = self._info(cert.name, current)
            except CertdError:
                continue
            if self._expiry_noted.get(cert.name) == info.serial:
                continue
            if policy.is_expiring_soon(info.not_before, info.not_after, now):
                if not self._note_expiring(cert, current, info):
                    return BUSY_RETRY  # the lock is busy: try again shortly
                continue
            at = policy.expiring_at(info.not_before, info.not_after)
            soonest = at if soonest is None or at < soonest else soonest
        return None if soonest is None else max(0.0, (soonest - now).total_seconds()) + 0.01

    def _note_expiring(self, cert: CertificateConfig, version: int, info: CertInfo) -> bool:
        """Remember the serial in the state (under the lock), then emit; False if the lock is busy."""
        try:
            with self.manager.store.lock(cert.name, timeout=0):
                state = self.manager.load_state(cert.name)
                seen = state.extra.get("expiring_soon_serial") == info.serial
                if not seen:  # that one field only (compare-and-set): nothing else is touched
                    state = self.manager.update_state(
                        cert.name, lambda s: s.extra.__setitem__("expiring_soon_serial", info.serial))
        except LockBusy:
            return False
        self._expiry_noted[cert.name] = info.serial
        if seen:
            return True
        why = (f"{state.failures} failed renewal attempt{'s' if state.failures != 1 else ''}, last: {state.last_error}"
               if state.failures else "no renewal has succeeded yet")
        reason = f"past the emergency point (a tenth of its lifetime left); {why}"
        event(log, "expiring_soon", logging.WARNING, name=cert.name, serial=info.serial,
              not_after=isoformat(info.not_after), reason=reason)
        self.manager.emit("expiring_soon", cert.name, outcome="warning", old_serial=info.serial, version=version,
                          not_after=info.not_after, reason=reason,
                          detail={"failures": state.failures, "last_error": state.last_error})
        return True

    def _info(self, name: str, version: int) -> CertInfo:
        key = (name, version)
        if key not in self._infos:
            self._infos[key] = self.manager.store.load(name, version).bundle.info
        return self._infos[key]

    # -- watching deployed files ----------------------------------------------------------------

    def _sync_watches(self, cfg: Config) -> None:
        """Watch the directories of every deploy target that exists (new ones appear after the
        first deploy, so this runs every round)."""
        if self._observer is None:
            return
        wanted = {(str(d), rec) for cert in cfg.certificates for d, rec in _watch_dirs(cert) if d.is_dir()}
        for key in list(self._watches):
            if key not in wanted:
                self._observer.unschedule(self._watches.pop(key))
        for key in wanted - self._watches.keys():
            try:
                self._watches[key] = self._observer.schedule(_Handler(self), key[0], recursive=key[1])
            except OSError as e:
                event(log, "drift_watch_failed", logging.WARNING, path=key[0], error=e.strerror or str(e))

    def file_changed(self, paths: Iterable[str]) -> None:
        """A watched file changed: check every certificate it belongs to, debounced."""
        cfg = self._config()
        owners = self._owners
        if owners is None or owners.config is not cfg:
            owners = self._owners = _Owners(cfg)
        for name in set().union(*(owners.of(p) for p in paths if p)):
            self.request(name)


class _Handler(FileSystemEventHandler):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def on_any_event(self, ev: FileSystemEvent) -> None:
        if ev.event_type in CHANGES:
            self.monitor.file_changed([str(ev.src_path), str(getattr(ev, "dest_path", "") or "")])


def _watch_dirs(cert: CertificateConfig) -> list[tuple[Path, bool]]:
    """(directory, recursive) to watch for ``cert``'s deploy targets (see certd/deploy/stage.py):
    one inotify watch per directory whose entries or files a server reads, never a recursive
    one. For a live_dir: its parent (the link), ``.NAME.versions`` (a version directory
    replaced or removed) and the live version's directory (its files edited); a staged or
    older version is not served, so an edit there is no drift. A recursive watch of
    ``.NAME.versions`` cost one watch per kept version (~6 per certificate: 600,000 at 100,000
    certificates against a default ``fs.inotify.max_user_watches`` of 8,192 to ~500,000); the
    live version's watch moves after a switch, since the link's change requests a round,
    and every round syncs the watches (docs/PERFORMANCE.md)."""
    d = cert.deploy
    dirs: list[tuple[Path, bool]] = []
    if d.live_dir is not None:
        root = d.live_dir.parent / f".{d.live_dir.name}.versions"
        dirs += [(d.live_dir.parent, False), (root, False)]
        live = _live_version_dir(d.live_dir, root)
        if live is not None:
            dirs.append((live, False))
    dirs += [(p.parent, False) for p in [d.combined, *(f.path for f in d.files)] if p is not None]
    return dirs


def _live_version_dir(link: Path, root: Path) -> Path | None:
    """The version directory under ``root`` the live_dir ``link`` points at, None if it points
    nowhere there (missing, not a link, elsewhere)."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    path = Path(os.path.normpath(link.parent / target))
    return path if path.parent == root else None


class _Owners:
    """Which certificates a deployed path belongs to: its live_dir link, anything below its
    versions directory, its combined/plain files and their staged ``.NAME.certd-*`` copies.
    Dictionary lookups, because a rotation writes dozens of files and each event scanned every
    certificate's paths with pathlib (a fifth of the daemon's CPU in the 200-name soak)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.exact: dict[str, set[str]] = {}
        self.roots: dict[str, set[str]] = {}
        self.staged: dict[tuple[str, str], set[str]] = {}
        for cert in config.certificates:
            d = cert.deploy
            if d.live_dir is not None:
                self.exact.setdefault(str(d.live_dir), set()).add(cert.name)
                root = str(d.live_dir.parent / f".{d.live_dir.name}.versions")
                self.roots.setdefault(root, set()).add(cert.name)
            for target in [d.combined, *(f.path for f in d.files)]:
                if target is not None:
                    self.exact.setdefault(str(target), set()).add(cert.name)
                    self.staged.setdefault((str(target.parent), target.name), set()).add(cert.name)

    def of(self, path: str) -> set[str]:
        path = os.path.normpath(path)
        owners = set(self.exact.get(path, ()))
        head, tail = os.path.split(path)
        i = tail.find(".certd-", 1) if tail.startswith(".") else -1
        while i != -1:  # .NAME.certd-*: a staged copy of NAME (NAME may hold ".certd-" itself)
            owners |= self.staged.get((head, tail[1:i]), set())
            i = tail.find(".certd-", i + 1)
        while True:  # the path or any directory above it may be a versions directory
            owners |= self.roots.get(path, set())
            parent = os.path.dirname(path)
            if parent == path:
                return owners
            path = parent
