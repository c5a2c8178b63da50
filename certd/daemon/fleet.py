"""A fleet node's own loop: heartbeat, and converge on the desired versions (``[cluster]`` only).

Ordering is the scheduler's (every node plans every certificate; the lease and the re-check of
the desired version under it make one order per renewal, :mod:`certd.store.pglease`). What
this loop adds is **convergence**: when the desired version of a certificate moves (a change
feed wake-up, delivered by LISTEN/NOTIFY within milliseconds) or at the latest every
``[cluster] reconcile_interval`` (notifications are lost while disconnected), every
certificate whose version applied on this node differs from the desired one is deployed here
through the rotation's own stage, switch, reload and verify, without the fleet-wide lease
(deploying on this node concerns this node only; this process's own rotation of the same
certificate is excluded by the store's local mutex). Then the node records ``applied`` and a
report (served fingerprint, verified at, last error) that ``certd status --fleet`` shows.

After the applies, a node that serves the desired version destroys its own copies of the
certificate's compromised keys (keyCompromise; :func:`certd.engine.compromise.destroy_on_node`)
and the pass records the fleet-wide completion of a compromised key no node holds any more
(:func:`certd.engine.compromise.fleet_completion`).

A failure is reported (``last_error``), audited (``node_applied``, outcome ``failed``), the
previous version switched back where one was applied and may still be deployed (S3: never to
a version marked bad, revoked or key-compromised — a canary of an aborted release; then the
node stays on the desired version, ``node_switch_back_refused``), and retried at the next
reconcile; it never moves the desired version. Right before staging, under the certificate's
local mutex, the version is checked again (it may have turned bad since it was read). With the
database unreachable the loop keeps what is served, logs once per attempt and tries again every
``reconcile_interval``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from certd import __version__
from certd.acme import answers, responders
from certd.config import CertificateConfig, Config, Listen
from certd.core.errors import CertdError, LockBusy, StoreUnreachable, OperationFailed
from certd.core.rotation import Effects
from certd.daemon.releasing import ReleaseDriver
from certd.engine import compromise
from certd.engine.manager import Manager
from certd.engine.releases import deploy_refusal
from certd.ops.log import event
from certd.store.pg import PgStore
from certd.store.port import Subscription

log = logging.getLogger("certd.fleet")

_RETRY = 5.0  # seconds between attempts while the database cannot be reached
_BUSY_RETRY = 0.25  # seconds before looking again at a certificate this process was rotating
#: an apply worker's job: certificate name, version, what to run, whether a pass follows at once
_Job = tuple[str, int, Callable[[], None], bool]


class FleetNode:
    """The heartbeat and apply loop of one node, on its own thread."""

    def __init__(self, manager: Manager, store: PgStore, config: Callable[[], Config], stop: threading.Event) -> None:
        self.manager, self.store, self._config, self._stop = manager, store, config, stop
        self.node = store.node
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="certd-fleet", daemon=True)
        # name -> (version, monotonic time) of its last failed apply: tried again a reconcile
        # interval later, or at once when the desired version moves on
        self._failed: dict[str, tuple[int, float]] = {}
        self._busy = False  # a certificate was busy in this process: the next pass comes soon
        self._said_removed = False
        # finishing what a stopped node left (an order: up to order_timeout; a rotation: its
        # reloads and verify) runs beside the apply loop, not in it: one slow CA must not hold
        # every other certificate's convergence on this node
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certd-finish")
        self._finishing: set[str] = set()
        self._finishing_lock = threading.Lock()
        # applies run on their own workers, handed over as the loop sees them: a pass does not
        # wait for the previous pass's applies, so a renewal committed while a wave is being
        # applied here starts at once instead of after the whole wave (see _hand_over). Plain
        # threads on a queue, ``[daemon] workers`` of them started together at the first job
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._appliers: list[threading.Thread] = []
        self._applying: set[str] = set()
        self._applying_lock = threading.Lock()

        self._listening: set[Listen] = set()
        self.releases = ReleaseDriver(manager, store, self._interval)

    def start(self) -> None:
        answers.share_answers(self.store.fleet)
        self.reconfigure()
        self._thread.start()

    def stop(self) -> None:
        self._wake.set()
        if self._thread.ident is not None:  # a SIGTERM during start-up recovery stops it before it started
            self._thread.join(timeout=30)
        self._finisher.shutdown(wait=True, cancel_futures=True)
        for _ in self._appliers:  # applies in flight reach their end (a reload, a verify); no new one starts
            self._jobs.put(None)
        for t in self._appliers:
            t.join()
        for listen in self._listening:
            responders.stop_listening(listen)
        self._listening.clear()
        answers.share_answers(None)

    def reclaim(self) -> None:
        """Before start-up recovery: free the leases this node's previous process held when it
        died, so its unfinished rotations are finished now rather than after the leases' TTL."""
        try:
            released = self.store.reclaim_dead_leases()
        except CertdError as e:  # the database is not there yet: recovery waits as it would have
            event(log, "lease_reclaim_failed", logging.WARNING, node=self.node, error=str(e))
            return
        if released:
            event(log, "leases_reclaimed", logging.WARNING, node=self.node, count=len(released),
                  names=",".join(released[:8]), reason="held by this node's previous process, which is gone")

    def reconfigure(self) -> None:
        """Keep an http-01 responder up on every ``http01_listen`` of the configuration: the
        CA's request for another node's order may come here at any time."""
        wanted = {c.http01_listen for c in self._config().certificates
                  if c.challenge == "http-01" and c.http01_webroot is None and c.http01_listen is not None}
        for listen in self._listening - wanted:
            responders.stop_listening(listen)
            self._listening.discard(listen)
        for listen in wanted - self._listening:
            try:
                responders.keep_listening(listen)
                self._listening.add(listen)
            except CertdError as e:
                event(log, "fleet_responder_failed", logging.ERROR, listen=str(listen), error=str(e))
        self.poke()

    def poke(self) -> None:
        """Reconcile now (a renewal on this node committed, a config reload)."""
        self._wake.set()

    def _interval(self) -> float:
        cluster = self._config().cluster
        return cluster.reconcile_interval if cluster is not None else 30.0

    def _run(self) -> None:
        sub: Subscription | None = None
        while not self._stop.is_set():
            try:
                removed = not self.store.fleet.heartbeat(self.node, __version__)
                if removed and not self._said_removed:  # once, not every pass
                    event(log, "node_removed_still_running", logging.WARNING, node=self.node,
                          hint="this node was removed with `certd nodes remove`; its reports do not count")
                self._said_removed = removed
                if sub is None:
                    # every notified name wakes the pass: a release step or report moves a release on
                    sub = self.store.subscribe([c.name for c in self._config().certificates], notified=True)
                self.reconcile()
                self._wait(sub)
            except CertdError as e:
                event(log, "fleet_unreachable", logging.WARNING, node=self.node, error=str(e))
                if sub is not None:
                    sub.close()
                    sub = None
                self._wake.wait(min(_RETRY, self._interval()))
            except Exception as e:  # noqa: BLE001 - a bug must not end this node's convergence for good
                log.exception("fleet_pass_failed node=%s error=%s", self.node, e)
                self._wake.wait(min(_RETRY, self._interval()))
            self._wake.clear()
        if sub is not None:
            sub.close()

    def _wait(self, sub: Subscription) -> None:
        """Until the desired versions change, a poke, the daemon stops, or the interval ends."""
        clock = self.manager.clock
        deadline = clock.monotonic() + (_BUSY_RETRY if self._busy else self._interval())
        self._busy = False
        while not (self._stop.is_set() or self._wake.is_set()):
            left = deadline - clock.monotonic()
            if left <= 0 or sub.changes(timeout=min(1.0, left)):
                return

    def reconcile(self) -> None:
        """One pass: finish orders whose node stopped; move on the releases that are due
        (:meth:`ReleaseDriver.drive_due`); apply every configured certificate's desired version
        where it differs."""
        config = self._config()
        for name in self.store.fleet.orphaned_orders(config.names):
            with self._finishing_lock:
                if name in self._finishing:
                    continue
                self._finishing.add(name)
            self._finisher.submit(self._finish, config.certificate(name))
        todo: list[tuple[CertificateConfig, int, int | None]] = []
        reports: list[tuple[CertificateConfig, int]] = []
        now = self.manager.clock.monotonic()
        self.releases.publish(config.certificates)  # which of its certificates this node can prove
        # [certificate.rollout]: move on the releases that are due, if this node may; read the
        # desired versions after (a release may have moved them)
        if self.releases.drive_due(config.certificates)[1]:
            self._busy = True  # another node held a lease: look again shortly
        views = self.store.fleet.node_view(self.node, config.names)
        for cert in config.certificates:
            if self._stop.is_set():
                return
            view = views.get(cert.name)
            if view is None:
                view = self.store.fleet.node_view(self.node, [cert.name])[cert.name]
            applied = view.applied
            desired = self.releases.target(cert, view.desired, applied)
            if desired is None:
                continue
            failed = self._failed.get(cert.name)
            if failed is not None and failed[0] == desired and now - failed[1] < self._interval():
                continue  # failed a moment ago: tried again at a later pass, not in a tight loop
            if applied != desired or failed is not None:
                todo.append((cert, desired, applied))
            elif not (view.reported if desired == view.desired else self._reported(cert.name, desired)):
                reports.append((cert, desired))
        self._hand_over(todo, reports, config.daemon.workers)
        self._destroy_compromised(config)

    def _destroy_compromised(self, config: Config) -> None:
        """keyCompromise (certd/engine/compromise.py): once this node serves the desired version
        (applied and verified, not failing), destroy its own copies of the certificate's other
        compromised keys and record it; then record the fleet-wide completion of any compromised
        key that no node (live or not, until removed) holds any more (one query each when there is nothing to do)."""
        book, ports = self.store.compromises, self.manager.ports
        for name, spkis in book.pending(config.names).items():
            applied = self.store.applied(self.node, name)
            if self._stop.is_set() or applied is None or name in self._failed or applied != self.store.desired(name):
                continue  # not moved yet: its apply comes first
            try:
                with self.store.locks.local(name, timeout=0):
                    compromise.destroy_on_node(ports, config.certificate(name), applied, sorted(spkis))
            except LockBusy:
                self._busy = True  # its own rotation runs: look again shortly
            except Exception as e:  # noqa: BLE001 - one certificate's trouble must not skip the others'
                log.exception("key_destroy_crashed name=%s node=%s error=%s", name, self.node, e)
        for name, spki in book.unfinished(config.names):
            compromise.fleet_completion(ports, name, spki, self.releases.live_within())

    def _hand_over(self, todo: list[tuple[CertificateConfig, int, int | None]],
                   reports: list[tuple[CertificateConfig, int]], workers: int) -> None:
        """Apply each of ``todo`` (and check by handshake each of ``reports``) on the apply
        workers, ``workers`` at a time, unless that certificate is being applied already; return
        at once. Certificates on one web server share its reloads
        (:class:`certd.reload.nginx.NginxGate`: one reload serves every switch made before it
        began), so a wave of renewals costs a few reloads on this node, not one each in turn.
        The fleet soak measured why the loop must not wait for them: with every pass waiting
        for its whole wave (2-13 s under load) a renewal committed meanwhile reached this node
        only after it, and commit -> every node took 8 s at the median."""
        # after an apply the next pass comes at once; after a report (which may keep failing,
        # and reports it) not before the next change or interval
        jobs = [(c.name, d, partial(self.apply, c, d, a), True) for c, d, a in todo]
        jobs += [(c.name, d, partial(self._report_served, c, d), False) for c, d in reports]
        with self._applying_lock:
            jobs = [job for job in jobs if job[0] not in self._applying]
            self._applying.update(job[0] for job in jobs)
        if not jobs:
            return
        if not self._appliers:
            self._appliers = [threading.Thread(target=self._applier, name=f"certd-apply-{i}", daemon=True)
                              for i in range(max(1, workers))]
            for t in self._appliers:
                t.start()
        for job in jobs:
            self._jobs.put(job)

    def _applier(self) -> None:
        """An apply worker: jobs until the None that stop() sends (jobs queued after a stop are
        skipped by _run_job)."""
        while (job := self._jobs.get()) is not None:
            self._run_job(*job)

    def _run_job(self, name: str, version: int, job: Callable[[], None], then_pass: bool) -> None:
        """One apply (or report) of ``version`` on an apply worker; the next pass sees what it left."""
        ok = False
        try:
            if not self._stop.is_set():
                job()
                ok = then_pass and name not in self._failed
        except CertdError as e:  # the store, mid-way: this certificate is tried again later
            self._failed[name] = (version, self.manager.clock.monotonic())
            event(log, "node_apply_failed", logging.WARNING, name=name, version=version, error=str(e))
        except Exception as e:  # noqa: BLE001 - one certificate's bug must not stop the others' applies
            self._failed[name] = (version, self.manager.clock.monotonic())
            log.exception("node_apply_crashed name=%s version=%s error=%s", name, version, e)
        finally:
            with self._applying_lock:
                self._applying.discard(name)
        if ok:
            self.poke()  # a version that moved while this one was applied is applied now

    def _finish(self, cert: CertificateConfig) -> None:
        """Finish the order or rotation a stopped node left for ``cert`` (on the finisher thread)."""
        try:
            outcome = self.manager.resume_order(cert, initiator=f"node={self.node}")
            event(log, "orphaned_order", name=cert.name, node=self.node, result=outcome.result.value,
                  message=outcome.message)
        except Exception as e:  # noqa: BLE001 - a thread's last word: logged, retried at the next pass
            event(log, "orphaned_order_failed", logging.ERROR, name=cert.name, node=self.node, error=str(e))
        finally:
            with self._finishing_lock:
                self._finishing.discard(cert.name)
            self.poke()  # apply what it committed here at once

    def _reported(self, name: str, version: int) -> bool:
        want = self.store.load_info(name, version).info.fingerprint_sha256
        return self.store.fleet.reported_fingerprint(self.node, name) == want

    def _report_served(self, cert: CertificateConfig, version: int) -> None:
        """Applied here (by this node's own rotation) but not reported yet: check by handshake."""
        outcome = self.manager.verify_now(cert)
        info = self.store.load_info(cert.name, version).info
        ok = outcome.result.value in ("verified", "not_due")
        self.store.fleet.report(self.node, cert.name, fingerprint=info.fingerprint_sha256 if ok else None,
                                verified_at=self.manager.clock.now() if outcome.result.value == "verified" else None,
                                error=None if ok else outcome.message)

    def apply(self, cert: CertificateConfig, version: int, previous: int | None) -> None:
        """Deploy ``version`` of ``cert`` on this node; record and report how it went."""
        started = self.manager.clock.monotonic()
        phases: dict[str, float] = {}
        try:
            with self.store.locks.local(cert.name, timeout=0):
                # S3, again now: the target was read before this pass's other certificates and
                # this wait; a release may have aborted it (or a revocation hit it) meanwhile
                refusal = deploy_refusal(self.store, cert.name, version)
                if refusal is not None:
                    self._refuse(cert, version, refusal)
                    return
                verified = self._deploy(cert, version, previous, phases)
        except LockBusy:
            # this node's own rotation of it is running (it applies or rolls back itself): look
            # again shortly, to report what it ended with
            if not self._stop.wait(_BUSY_RETRY):
                self.poke()
            return
        except CertdError as e:
            self._failed[cert.name] = (version, self.manager.clock.monotonic())
            self.store.fleet.report(self.node, cert.name, fingerprint=None, verified_at=None,
                                    error=f"applying version {version}: {e}")
            if not isinstance(e, StoreUnreachable):
                # the database out of reach says nothing about the version: it is tried again, not
                # held against it (the releases soak saw a 6 s PostgreSQL restart abort 14 releases
                # and roll 2 back, marking 16 good versions bad)
                self.releases.reported(cert, version, str(e))
            self._emit(cert.name, version, previous, "failed", str(e), started, phases)
            return
        self._failed.pop(cert.name, None)
        info = self.store.load_info(cert.name, version).info
        self.store.set_applied(self.node, cert.name, version)
        self.store.fleet.report(self.node, cert.name, fingerprint=info.fingerprint_sha256,
                                verified_at=self.manager.clock.now() if verified else None, error=None)
        self.releases.reported(cert, version, None)
        self._emit(cert.name, version, previous, "success", "desired version changed", started, phases)

    def _refuse(self, cert: CertificateConfig, version: int, refusal: str) -> None:
        """``version`` may not be deployed any more: nothing is touched; reported (it is not a
        failure of the version, so not retried as one: the change that made it bad wakes the
        next pass, which reads the target afresh)."""
        event(log, "node_apply_refused", logging.WARNING, name=cert.name, version=version, node=self.node,
              reason=refusal)
        self.store.fleet.report(self.node, cert.name, fingerprint=None, verified_at=None,
                                error=f"not applying version {version}: {refusal}")

    def _deploy(self, cert: CertificateConfig, version: int, previous: int | None, phases: dict[str, float]) -> bool:
        """Stage, switch, reload, verify; switched back to ``previous`` if reload or verify fail
        and ``previous`` may still be deployed (:meth:`_switch_back`). ``phases`` gets the
        seconds each took (the ``node_applied`` log line says them)."""
        effects = self.manager.ports.edges.effects(cert)
        clock = self.manager.clock
        t0 = clock.monotonic()
        effects.stage(version)
        effects.switch(version)
        t1 = clock.monotonic()
        try:
            effects.reload(version)
            t2 = clock.monotonic()
            verified = effects.verify(version)
            phases.update(stage_s=t1 - t0, reload_s=t2 - t1, verify_s=clock.monotonic() - t2)
            return verified
        except CertdError as e:
            if previous is None or previous not in self.store.versions(cert.name):
                raise
            refusal = deploy_refusal(self.store, cert.name, previous)
            if refusal is not None:
                raise self._no_switch_back(cert, version, previous, refusal, e) from e
            self._switch_back(cert, effects, previous)
            raise

    def _switch_back(self, cert: CertificateConfig, effects: Effects, previous: int) -> None:
        try:
            effects.stage(previous)
            effects.switch(previous)
            effects.reload(previous, keep_going=True)
            effects.verify(previous)  # L3: the node proves it serves the previous one again
        except CertdError as e:
            event(log, "node_switch_back_failed", logging.ERROR, name=cert.name, version=previous, error=str(e))

    def _no_switch_back(self, cert: CertificateConfig, version: int, previous: int, refusal: str,
                        error: CertdError) -> OperationFailed:
        """``version`` failed, and ``previous`` (what this node served) may not be deployed any
        more (S3: marked bad, revoked, key compromised — a canary of an aborted release). The
        node stays on ``version``: it is the desired one, the only version it may serve; its
        files stay switched in (the server may keep the old certificate in memory until a reload
        works) and the apply is tried again at every pass. Audited, alerted and reported."""
        why = f"{error}; not switched back to version {previous} ({refusal}): version {version} stays in place"
        event(log, "node_switch_back_refused", logging.ERROR, name=cert.name, version=previous, node=self.node,
              staying=version, reason=refusal)
        self.manager.emit("node_switch_back_refused", cert.name, initiator=f"node={self.node}", outcome="failed",
                          reason=refusal, version=previous, detail={"node": self.node, "staying_on": version,
                                                                    "error": str(error)})
        return OperationFailed(why)

    def _emit(self, name: str, version: int, previous: int | None, outcome: str, reason: str,
              started: float, phases: dict[str, float]) -> None:
        detail: dict[str, Any] = {"node": self.node, "from_version": previous}
        seconds = self.manager.clock.monotonic() - started
        self.manager.emit("node_applied", name, initiator=f"node={self.node}", outcome=outcome, reason=reason,
                          version=version, duration=seconds, detail=detail)
        event(log, "node_applied", logging.INFO if outcome == "success" else logging.ERROR, name=name,
              version=version, node=self.node, outcome=outcome, reason=reason, seconds=round(seconds, 2),
              **{k: round(v, 2) for k, v in phases.items()})


def start_fleet(manager: Manager, config: Callable[[], Config], stop: threading.Event) -> FleetNode | None:
    """The node loop when the store is the fleet's database (``[cluster]``), else None."""
    store = manager.store
    if not isinstance(store, PgStore):
        return None
    return FleetNode(manager, store, config, stop)
