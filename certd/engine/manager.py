"""Composition: the operations users ask for (renew, roll back, verify, status), built from the
pure core (policy, rotation) and the edges (issuer, store, deploy, hooks, verify).

Every operation on a certificate takes its per-certificate lock, then looks at the store again
before acting (another process may have just renewed it), and first finishes any rotation a
crash left unfinished.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from certd.engine import attempts
from certd.crypto import certcheck
from certd.deploy import stage as deploy
from certd.crypto import keys
from certd.engine import revocation
from certd.core import rotation
from certd.deploy import strictmodes
from certd.verify import handshake as verify
from certd.core.clock import Clock, SystemClock, isoformat
from certd.config import CertificateConfig, Config
from certd.engine.effects import STEP_TEXT, RotationEffects, failed_step, idle_actions
from certd.core.errors import CANotReachable, CertdError, OperationFailed, StoreError, UsageError
from certd.core.events import EventBus, LifecycleEvent
from certd.acme.issuer import Issuer, ari_cert_id, connect
from certd.ops.log import event
from certd.engine.attempts import CertState
from certd.engine.planning import Planner
from certd.core.rotation import Journal, Step
from certd.store.files import FileStore, Store, StoredVersion

log = logging.getLogger("certd")

Progress = Callable[[str, str], None]   # (certificate name, message)


def whoami() -> str:
    """The initiator recorded for actions taken from this process's CLI."""
    uid = os.getuid()
    try:
        return f"uid={uid}({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid={uid}"


@dataclass(frozen=True)
class Outcome:
    """What happened to one certificate in one operation."""

    name: str
    result: str          # renewed | not_due | failed | rolled_back | rollback_failed | deployed_unverified | switched
    message: str
    version: int | None = None
    serial: str | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("renewed", "not_due", "switched", "verified", "revoked")


class Manager:
    def __init__(self, config: Config, *, store: Store | None = None, issuer: Issuer | None = None,
                 clock: Clock | None = None, lock_timeout: float = 0.0, events: EventBus | None = None) -> None:
        self.config = config
        self.events = events or EventBus()
        self.clock = clock or SystemClock()
        self.store = store or FileStore(config.daemon.state_dir)
        self._issuer = issuer
        self.lock_timeout = lock_timeout
        self.planner = Planner(self.store, self.clock, lambda: self.issuer)
        #: True in the daemon, which retries failed renewals by itself; the one-shot CLI does not,
        #: so its messages must not say "will retry" (see attempts.next_step).
        self.retries = False
        self.planner.on_broken = lambda name, why: self.emit("cert_broken", name, outcome="broken", reason=why)

    @property
    def issuer(self) -> Issuer:
        if self._issuer is None:
            self._issuer = connect(self.config.acme, self.store, self.clock,
                                   on_request=lambda seconds: self.events.measure("acme_request", seconds))
        return self._issuer

    def close(self) -> None:
        if self._issuer is not None:
            self._issuer.close()

    def reconfigure(self, config: Config) -> None:
        """Use a new (validated) config from now on; rotations in flight keep theirs."""
        old, self.config = self.config, config
        if config.acme != old.acme and self._issuer is not None:
            self._issuer = None  # the next operation builds one for the new CA settings

    def plan(self, cert: CertificateConfig) -> tuple[datetime, str]:
        """When the daemon should next look at ``cert`` (see Planner.plan)."""
        return self.planner.plan(cert)

    def status(self, cert: CertificateConfig) -> dict[str, Any]:
        """One ``status --json`` row (see docs/CONTRACT.md); no network I/O."""
        return self.planner.status(cert)

    def status_json(self, cert: CertificateConfig, next_run: str | None = None) -> str:
        """:meth:`status` as one line of JSON text (with the daemon's ``next_run``)."""
        return self.planner.status_json(cert, next_run)

    def load_state(self, name: str) -> CertState:
        return self.planner.load_state(name)

    def save_state(self, name: str, state: CertState) -> None:
        self.planner.save_state(name, state)

    def select(self, names: Iterable[str]) -> list[CertificateConfig]:
        """The configured certificates named (all when none named); UsageError for unknown names."""
        names = list(names)
        if not names:
            return list(self.config.certificates)
        known = set(self.config.names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"unknown certificate {', '.join(unknown)}; configured: {self.config.names_summary()}")
        return [self.config.certificate(n) for n in names]

    # -- renewal --------------------------------------------------------------------------

    def renew(self, certs: Iterable[CertificateConfig], *, force: bool = False, reason: str = "",
              initiator: str = "scheduler", progress: Progress | None = None,
              workers: int | None = None, ignore_duplicate_limit: bool = False) -> list[Outcome]:
        """Renew each certificate that is due (all of them with ``force``), up to ``workers``
        (default ``[daemon] workers``) at a time, each under its own lock; one failure does not
        stop the others. Outcomes come back in the order of ``certs``, whatever order they
        finish in."""
        certs = list(certs)
        workers = max(1, min(workers or self.config.daemon.workers, len(certs)))
        if workers > 1 and progress is not None:
            progress = _serialized(progress)

        def one(cert: CertificateConfig) -> Outcome:
            try:
                return self.renew_one(cert, force=force, reason=reason, initiator=initiator, progress=progress,
                                      ignore_duplicate_limit=ignore_duplicate_limit)
            except Exception as e:  # a bug in one renewal must not lose the others' outcomes
                log.exception("renewal of %s crashed", cert.name)
                return Outcome(cert.name, "failed", f"internal error: {type(e).__name__}: {e}")

        if workers == 1:
            return [one(c) for c in certs]
        _ = self.issuer  # built once here, not raced for by the workers
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="certd-renew") as pool:
            return list(pool.map(one, certs))

    def renew_one(self, cert: CertificateConfig, *, force: bool = False, reason: str = "",
                  initiator: str = "scheduler", progress: Progress | None = None,
                  skip_backoff: bool = False, ignore_duplicate_limit: bool = False) -> Outcome:
        """Renew ``cert`` if due (now with ``force``). ``skip_backoff``: the CA is known to be
        back, so a certificate waiting out a failure backoff is retried now if otherwise due.
        A forced renewal that would exceed the CA's duplicate-certificate limit is refused
        unless ``ignore_duplicate_limit``."""
        say = _sayer(cert.name, progress)
        try:
            with self.store.lock(cert.name, timeout=self.lock_timeout):
                resumed = self._recover(cert, say)
                outcome = self._renew_locked(cert, force, reason, initiator, say, skip_backoff,
                                             ignore_duplicate_limit)
                return outcome if resumed is None else _with_resumed(outcome, resumed)
        except CertdError as e:
            event(log, "renewal_failed", logging.ERROR, name=cert.name, error=str(e))
            return Outcome(cert.name, "failed", str(e))

    def _renew_locked(self, cert: CertificateConfig, force: bool, reason: str, initiator: str,
                      say: Callable[[str], None], skip_backoff: bool = False,
                      ignore_duplicate_limit: bool = False) -> Outcome:
        strictmodes.require_safe(cert)  # before any order: no hook of others, no wasted issuance
        current = self.store.current(cert.name)
        stored = self.store.load(cert.name, current) if current is not None else None
        state = self.load_state(cert.name)
        if not force:
            decision = self.planner.decide(cert, stored, state, refresh_ari=True, ignore_failures=skip_backoff)
            event(log, "renewal_decision", name=cert.name, renew_at=isoformat(decision.renew_at),
                  reason=decision.reason, due=decision.is_due(self.clock.now()))
            if not decision.is_due(self.clock.now()):
                return Outcome(cert.name, "not_due", f"renews at {isoformat(decision.renew_at)}: {decision.reason}",
                               current, stored.bundle.info.serial if stored else None)
            reason = reason or decision.reason
            if decision.ca_requested and initiator == "scheduler":
                initiator = "ari"  # the CA asked (ARI window in the past), not our own schedule
        else:
            now = self.clock.now()
            refusal = None if ignore_duplicate_limit else attempts.duplicate_refusal(state, cert.domains, now)
            if refusal is not None:
                return Outcome(cert.name, "refused", f"not renewing {cert.name}: {refusal}", current,
                               stored.bundle.info.serial if stored else None)
            detail: dict[str, Any] = {}
            until = attempts.blocked_until(state, now)
            if until is not None:  # the operator says "fixed, try now": bypass the hold once, on record
                detail["bypassed"] = {"failure_kind": state.failure_kind, "problem": state.problem,
                                      "retry_after": isoformat(until)}
                say(f"trying now although {state.failure_kind} until {isoformat(until)} (forced)")
            self.emit("forced", cert.name, initiator=initiator, reason=reason, outcome="requested",
                      old_serial=stored.bundle.info.serial if stored else None, version=current, detail=detail)
        started = self.clock.monotonic()
        state.last_attempt = isoformat(self.clock.now())
        try:
            key_pem = self._key_for(cert, stored)
            replaces = self._replaces(stored, cert)
            say("ordering from the CA" + (f" (replaces {replaces})" if replaces else ""))
            fullchain = self.issuer.issue(cert, key_pem, replaces=replaces, progress=say)
            bundle = certcheck.check_issued(fullchain, key_pem, cert.domains, self.clock.now())
            info = bundle.info
            say(f"issued serial {info.serial}, not after {isoformat(info.not_after)}")
            version = self.store.add_version(cert.name, bundle, {
                "created": isoformat(self.clock.now()), "initiator": initiator, "reason": reason,
                "serial": info.serial, "not_after": isoformat(info.not_after),
                "fingerprint_sha256": info.fingerprint_sha256, "replaces": replaces,
            })
        except OperationFailed as e:
            if force:  # the operator asked for a new certificate: retried on the backoff until one comes
                state.forced_retry = reason or "forced"
            self._record_failure(cert, state, str(e), ca_unreachable=isinstance(e, CANotReachable),
                                 initiator=initiator, reason=reason, exc=e)
            return Outcome(cert.name, "failed",
                           attempts.next_step(str(e), cert.name, state, self.clock.now(), self.retries), current)
        attempts.note_issued(state, cert.domains, self.clock.now())
        event(log, "cert_issued", name=cert.name, version=version, serial=info.serial,
              not_after=isoformat(info.not_after), initiator=initiator)
        self.emit("issued", cert.name, initiator=initiator, reason=reason, version=version, new_serial=info.serial,
                  old_serial=stored.bundle.info.serial if stored else None, spki_sha256=info.spki_sha256,
                  not_after=info.not_after, duration=self.clock.monotonic() - started)
        j = rotation.start(cert.name, "renew", current, version, self.clock.now(),
                           initiator=initiator, reason=reason)
        self._save_journal(j)
        rotation.crash_point(Step.ISSUED)
        j = self._drive(cert, j, say)
        return self._finish(cert, j, state, self.clock.monotonic() - started)

    def _key_for(self, cert: CertificateConfig, stored: StoredVersion | None) -> bytes:
        if cert.reuse_key and stored is not None and stored.bundle.info.key_type == cert.key_type \
                and not stored.meta.get("key_compromised"):
            return stored.bundle.key_pem
        return keys.generate_private_key(cert.key_type)

    def _replaces(self, stored: StoredVersion | None, cert: CertificateConfig) -> str | None:
        """The ARI id the new order replaces (RFC 9773 §5); none when the configured names
        differ from the stored certificate's (a CA refuses replaces for other identifiers)."""
        if stored is None or set(stored.bundle.info.domains) != set(cert.domains):
            return None
        try:
            return ari_cert_id(stored.bundle.cert_pem)
        except (ValueError, TypeError):  # no AKI: the CA cannot have ARI for it
            return None

    # -- revocation -----------------------------------------------------------------------

    def revoke(self, cert: CertificateConfig, reason: str, *, initiator: str = "operator",
               progress: Progress | None = None) -> Outcome:
        """Revoke the current certificate at the CA (``reason``: a name in revocation.REASONS)
        and follow up as the reason demands (certd/engine/revocation.py): result ``revoked`` when every
        step succeeded. UsageError if there is nothing to revoke."""
        say = _sayer(cert.name, progress)
        try:
            with self.store.lock(cert.name, timeout=self.lock_timeout):
                self._recover(cert, say)
                return revocation.revoke_locked(
                    self, cert, reason, initiator, say,
                    rotate=lambda why: self._renew_locked(cert, True, why, initiator, say))
        except UsageError:
            raise
        except CertdError as e:
            event(log, "revocation_failed", logging.ERROR, name=cert.name, error=str(e))
            return Outcome(cert.name, "failed", str(e))

    # -- rollback -------------------------------------------------------------------------

    def rollback(self, cert: CertificateConfig, *, to_version: int | None = None, reason: str = "",
                 initiator: str = "operator", progress: Progress | None = None) -> Outcome:
        """Switch back to ``to_version`` (default: the previous good version) through the same
        stage/switch/reload/verify path; if the target cannot be verified, return to the current one."""
        say = _sayer(cert.name, progress)
        try:
            with self.store.lock(cert.name, timeout=self.lock_timeout):
                self._recover(cert, say)
                current = self.store.current(cert.name)
                if current is None:
                    raise UsageError(f"{cert.name} has no certificate yet; nothing to roll back")
                target = to_version if to_version is not None else self._previous_good(cert.name, current)
                self._check_target(cert.name, current, target)
                started = self.clock.monotonic()
                say(f"rolling back from version {current} to {target}")
                j = rotation.start(cert.name, "rollback", current, target, self.clock.now(),
                                   initiator=initiator, reason=reason)
                self._save_journal(j)
                j = self._drive(cert, j, say)
                return self._finish(cert, j, self.load_state(cert.name), self.clock.monotonic() - started)
        except UsageError:
            raise
        except CertdError as e:
            return Outcome(cert.name, "failed", str(e))

    def _previous_good(self, name: str, current: int) -> int:
        j = self._load_journal(name)
        if j is not None and j.succeeded and j.to_version == current and j.from_version is not None \
                and j.from_version in self.store.versions(name):
            return j.from_version
        older = [v for v in self.store.versions(name) if v < current]
        if not older:
            raise UsageError(f"{name} has no earlier version to roll back to (versions: {self.store.versions(name)})")
        return older[-1]

    def _check_target(self, name: str, current: int, target: int) -> None:
        versions = self.store.versions(name)
        if target not in versions:
            raise UsageError(f"{name} has no version {target}; stored versions: {', '.join(map(str, versions))}")
        if target == current:
            raise UsageError(f"{name} version {target} is already current")
        sv = self.store.load(name, target)
        if sv.meta.get("key_compromised"):
            raise UsageError(f"{name} version {target} has a compromised key; it cannot be deployed again")
        if sv.meta.get("revoked"):
            raise UsageError(f"{name} version {target} was revoked ({sv.meta['revoked'].get('reason')}); "
                             f"it cannot be deployed again")
        if sv.bundle.info.not_after <= self.clock.now():
            raise UsageError(f"{name} version {target} expired at {isoformat(sv.bundle.info.not_after)}; "
                             "choose a newer one")

    def redeploy(self, cert: CertificateConfig, *, progress: Progress | None = None) -> Outcome:
        """Put the current version back where the servers read it (drift repair): stage it
        again (rewriting deployed files edited out of band), switch, run the reload hooks and
        verify by handshake, with the rotation's own effects.

        No journal: the target is the version the store already names current and every step
        is idempotent, so an interrupted repair is simply done again; the store is not changed.
        Result ``verified`` (or ``switched`` without verify endpoints), else ``failed``."""
        say = _sayer(cert.name, progress)
        current: int | None = None
        try:
            with self.store.lock(cert.name, timeout=self.lock_timeout):
                self._recover(cert, say)
                current = self.store.current(cert.name)
                if current is None:
                    return Outcome(cert.name, "not_due", "no certificate issued yet; nothing to redeploy")
                effects = RotationEffects(self.store, self.clock, self.events, cert, repair=True)
                effects.stage(current)
                effects.switch(current)
                effects.reload(current)
                verified = effects.verify(current)
        except CertdError as e:
            return Outcome(cert.name, "failed", f"redeploying version {current}: {e}", current)
        serial = self._serial(cert.name, current)
        event(log, "cert_redeployed", name=cert.name, version=current, serial=serial, verified=verified)
        return Outcome(cert.name, "verified" if verified else "switched",
                       f"redeployed version {current}, serial {serial}" + ("; verified" if verified else ""),
                       current, serial)

    # -- the rotation's edges -------------------------------------------------------------

    def _drive(self, cert: CertificateConfig, j: Journal, say: Callable[[str], None]) -> Journal:
        def on_step(jj: Journal) -> None:
            event(log, f"rotation_{jj.step.value}", name=jj.name, version=jj.to_version,
                  kind=jj.kind, error=jj.error if jj.step in (Step.ROLLING_BACK, Step.FAILED) else None)
            text = STEP_TEXT.get(jj.step, jj.step.value)
            if jj.step == Step.VERIFIED and not cert.verify:
                text = "no [[certificate.verify]] endpoints: the live handshake was not checked"
            say(text.format(j=jj))
            self._emit_step(cert, jj)
        effects = RotationEffects(self.store, self.clock, self.events, cert)
        return rotation.drive(j, effects, self._save_journal, self.clock, on_step, idle=idle_actions(cert))

    def _finish(self, cert: CertificateConfig, j: Journal, state: CertState, seconds: float) -> Outcome:
        version = j.to_version if j.step == Step.COMMITTED or j.unverified else j.from_version
        serial = None
        if version is not None:
            serial = self.store.load_info(cert.name, version).info.serial
        if j.step == Step.COMMITTED:
            self._prune(cert, j.initiator)
            revocation.destroy_compromised_keys(self, cert, j.initiator)
            info = self._info(cert.name, version)
            fields: dict[str, Any] = {"initiator": j.initiator, "reason": j.reason, "version": version,
                                      "new_serial": serial, "old_serial": self._serial(cert.name, j.from_version),
                                      "spki_sha256": info.spki_sha256 if info else None,
                                      "not_after": info.not_after if info else None, "duration": seconds}
            if j.kind == "renew":
                state.failures, state.last_error, state.ari, state.ca_unreachable = 0, None, None, False
                attempts.clear(state)
                state.last_success = isoformat(self.clock.now())
                result, msg = "renewed", f"renewed: version {version}, serial {serial} ({seconds:.2f}s)"
                self.emit("renewed", cert.name, **fields)
            else:
                result, msg = "switched", f"rolled back to version {version}, serial {serial}; verified"
                self.emit("operator_rollback", cert.name, **fields)
            state.last_result = j.result
            self.save_state(cert.name, state)
            return Outcome(cert.name, result, msg, version, serial)
        error = j.error or "unknown error"
        if j.step == Step.ROLLED_BACK:
            result, msg = "rolled_back", f"rolled back to version {j.from_version} (serial {serial}, verified): {error}"
        elif j.step == Step.ROLLBACK_FAILED:
            result, msg = "rollback_failed", rollback_failed_message(j)
        elif j.unverified:
            result, msg = "deployed_unverified", f"deployed version {version} but could not verify it: {error}"
        else:
            result, msg = "failed", error
        if j.kind == "renew":
            self._record_failure(cert, state, msg, result=j.result, failed_step=failed_step(j),
                                 initiator=j.initiator, reason=j.reason)
        return Outcome(cert.name, result, msg, version, serial)

    def _record_failure(self, cert: CertificateConfig, state: CertState, error: str, result: str = "failed",
                        ca_unreachable: bool = False, failed_step: str | None = None,
                        initiator: str = "scheduler", reason: str = "", exc: BaseException | None = None) -> None:
        event(log, "renewal_failed", logging.ERROR, name=cert.name, failures=state.failures + 1, error=error)
        detail: dict[str, Any] = {"failures": state.failures + 1, "error": error}
        if failed_step is not None:
            detail["failed_step"] = failed_step
        # reason: why the renewal was asked for (the operator's --reason); the error goes in detail
        self.emit("renewal_failed", cert.name, outcome=result, reason=reason, detail=detail, initiator=initiator)
        state.ca_unreachable = ca_unreachable
        state.failures += 1
        state.last_failure = isoformat(self.clock.now())
        state.last_error = error
        state.last_result = result
        rule = attempts.note_failure(state, exc, self.clock.now(), timedelta(0))
        state.last_error = attempts.next_step(error, cert.name, state, self.clock.now(), self.retries)
        if rule.kind != "transient":
            event(log, "renewal_blocked", logging.WARNING, name=cert.name, kind=rule.kind, problem=state.problem,
                  retry_after=state.retry_after, cite=rule.cite)
        try:
            self.save_state(cert.name, state)
        except StoreError as e:
            event(log, "state_not_saved", logging.WARNING, name=cert.name, error=str(e))

    def _prune(self, cert: CertificateConfig, initiator: str = "scheduler") -> None:
        current = self.store.current(cert.name)
        versions = self.store.versions(cert.name)
        serials = {v: self._serial(cert.name, v) for v in versions} if len(versions) > cert.keep_versions else {}
        removed = self.store.prune(cert.name, cert.keep_versions, protect={current} if current else ())
        deploy.prune(cert, set(self.store.versions(cert.name)))
        if removed:
            event(log, "versions_pruned", name=cert.name, versions=",".join(map(str, removed)))
        for v in removed:
            self.emit("version_pruned", cert.name, version=v, reason=f"keep_versions = {cert.keep_versions}",
                      initiator=initiator, old_serial=serials.get(v))

    def _recover(self, cert: CertificateConfig, say: Callable[[str], None]) -> Journal | None:
        """Finish a rotation that a crash left unfinished (see certd/core/rotation.py for the rule)."""
        j = self._load_journal(cert.name)
        if j is None or j.finished:
            return None
        event(log, "rotation_resumed", logging.WARNING, name=cert.name, step=j.step.value, version=j.to_version)
        say(f"resuming an unfinished {j.kind} at step {j.step.value}")
        j = self._drive(cert, j, say)
        self._finish(cert, j, self.load_state(cert.name), 0.0)
        return j

    def recover_all(self, workers: int = 1, stop: threading.Event | None = None) -> list[Journal]:
        """Finish every unfinished rotation (called at daemon start), ``workers`` at a time.

        Once ``stop`` is set (SIGTERM while starting), those already being finished reach
        their end and the rest are left to their journals for the next start: a stop must
        not wait for hundreds of reloads.

        A crash in the middle of many rotations leaves many to finish, each waiting for its
        servers' reload; one after the other (a 200-site nginx reloads in seconds) the daemon
        would renew nothing else for minutes, while side by side they share reloads. One that
        cannot be finished (a corrupt journal, a lock held elsewhere) is logged and left for
        its next renewal attempt, which reports it: it must not keep every other certificate
        from being renewed.
        """
        pending = []
        for cert in self.config.certificates:
            j = self._load_journal(cert.name)
            if j is not None and not j.finished:
                pending.append(cert)  # no lock needed to know that (10,000 locks: ~0.5 s)

        deferred: list[str] = []

        def stopping() -> bool:
            return stop is not None and stop.is_set()

        def finish(cert: CertificateConfig) -> Journal | None:
            try:
                if not stopping():
                    with self.store.lock(cert.name, timeout=self.lock_timeout):  # _recover looks again
                        if not stopping():  # waiting for the lock may have taken a while
                            return self._recover(cert, _sayer(cert.name, None))
            except CertdError as e:
                event(log, "recovery_failed", logging.ERROR, name=cert.name, error=str(e))
                return None
            deferred.append(cert.name)
            return None

        if workers <= 1 or len(pending) <= 1:
            results = [finish(cert) for cert in pending]
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(pending)), thread_name_prefix="certd-recover") as pool:
                results = list(pool.map(finish, pending))
        if deferred:
            event(log, "recovery_deferred", logging.WARNING, count=len(deferred), names=",".join(deferred[:8]),
                  reason="stopping; the next start finishes them")
        return [j for j in results if j is not None]

    # -- verification and status ----------------------------------------------------------

    def verify_now(self, cert: CertificateConfig) -> Outcome:
        current = self.store.current(cert.name)
        if current is None:
            return Outcome(cert.name, "failed", "no certificate issued yet")
        if not cert.verify:
            return Outcome(cert.name, "not_due", "no [[certificate.verify]] endpoints configured", current)
        info = self.store.load(cert.name, current).bundle.info
        try:
            served = verify.await_served(cert.verify, info.fingerprint_sha256, timeout=min(cert.verify_timeout, 3.0),
                                         clock=self.clock)
        except OperationFailed as e:
            return Outcome(cert.name, "failed", str(e), current, info.serial)
        where = ", ".join(str(s.endpoint) for s in served)
        return Outcome(cert.name, "verified", f"serial {info.serial} served on {where}", current, info.serial)

    # -- events ---------------------------------------------------------------------------

    def emit(self, kind: str, name: str, **fields: Any) -> None:
        self.events.emit(LifecycleEvent(kind, name, self.clock.now(), **fields))

    def _emit_step(self, cert: CertificateConfig, j: Journal) -> None:
        """Lifecycle events for the journal steps an operator cares about."""
        common: dict[str, Any] = {"initiator": j.initiator, "reason": j.reason}
        if j.step == Step.VERIFIED and not cert.verify:
            return  # nothing was checked: the audit log must not say "verified"
        if j.step in (Step.SWITCHED, Step.VERIFIED):
            info = self._info(cert.name, j.to_version)
            kind = "deployed" if j.step == Step.SWITCHED else "verified"
            self.emit(kind, cert.name, version=j.to_version, new_serial=info.serial if info else None,
                      old_serial=self._serial(cert.name, j.from_version), **common)
        elif j.step == Step.ROLLED_BACK:
            self.emit("rolled_back", cert.name, outcome="rolled_back", version=j.from_version,
                      old_serial=self._serial(cert.name, j.to_version),
                      new_serial=self._serial(cert.name, j.from_version),
                      detail={"error": j.error, "failed_step": failed_step(j)}, **common)
        elif j.step == Step.ROLLBACK_FAILED:  # serials as in rolled_back: from the new version back to the old
            self.emit("rollback_failed", cert.name, outcome="rollback_failed", version=j.from_version,
                      old_serial=self._serial(cert.name, j.to_version),
                      new_serial=self._serial(cert.name, j.from_version),
                      detail={"error": j.error, "rollback_error": j.rollback_error,
                              "failed_step": failed_step(j)}, **common)

    def _info(self, name: str, version: int | None) -> Any:
        if version is None:
            return None
        try:
            return self.store.load_info(name, version).info  # no PEM files, no key
        except CertdError:
            return None

    def _serial(self, name: str, version: int | None) -> str | None:
        info = self._info(name, version)
        return info.serial if info else None

    # -- persistence helpers --------------------------------------------------------------

    def _load_journal(self, name: str) -> Journal | None:
        d = self.store.load_journal(name)
        return Journal.from_json(d) if d else None

    def _save_journal(self, j: Journal) -> None:
        self.store.save_journal(j.name, j.to_json())


def _with_resumed(outcome: Outcome, j: Journal) -> Outcome:
    """``outcome`` whose message also says how the rotation a crash left unfinished ended: the
    report on stdout is where the operator looks, not a WARNING on stderr."""
    ended = {Step.COMMITTED: f"committed version {j.to_version}",
             Step.ROLLED_BACK: f"rolled back to version {j.from_version}",
             Step.ROLLBACK_FAILED: "ROLLBACK FAILED"}.get(j.step, j.step.value)
    note = f"resumed a {j.kind} to version {j.to_version} that a crash interrupted: {ended}"
    return replace(outcome, message=f"{note}; {outcome.message}")


_FINGERPRINT = re.compile(r"\b([0-9a-f]{8})[0-9a-f]{56}\b")


def rollback_failed_message(j: Journal) -> str:
    """The one line a page starts from: what failed and why the old version is not proven
    served, without repeating the served certificate's description (the rotation's own error
    and the full fingerprints stay in the audit record's detail)."""
    step = failed_step(j) or "the rotation"
    why = _FINGERPRINT.sub(r"\1…", j.rollback_error or "unknown error")
    return (f"ROLLBACK FAILED, check the endpoints now: version {j.to_version} failed at {step}; version "
            f"{j.from_version} not proven served: {why}")


def _serialized(progress: Progress) -> Progress:
    """``progress`` for several threads: one message at a time (lines never interleave)."""
    lock = threading.Lock()

    def say(name: str, message: str) -> None:
        with lock:
            progress(name, message)
    return say


def _sayer(name: str, progress: Progress | None) -> Callable[[str], None]:
    def say(message: str) -> None:
        if progress is not None:
            progress(name, message)
    return say
