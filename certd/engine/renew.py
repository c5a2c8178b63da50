"""Renew: decide whether a certificate is due, order a new one from the CA, store it, and roll
it out through stage, switch, reload and verify (or back, if it fails there).

Every path ends in one :class:`~certd.engine.outcome.Outcome`:

- ``not_due``: not forced and the policy's time has not come (or a hold lasts);
- ``refused``: forced, but another certificate for these names would exceed the CA's
  duplicate-certificate limit (unless ``ignore_duplicate_limit``);
- ``failed``: the order, the check of what the CA sent, or a step before the switch failed;
- ``renewed``: the new version is committed;
- ``rolled_back`` / ``rollback_failed`` / ``deployed_unverified``: how a failed rollout ended.

The certificate's lock is held from the first look at the store to the end, and a rotation a
crash left unfinished is finished first (its end is prefixed to the outcome's message).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any, Iterable

from certd.config import CertificateConfig
from certd.core import policy, rotation
from certd.core.clock import isoformat
from certd.core.concurrency import bounded_map
from certd.core.errors import CANotReachable, CertdError, OperationFailed, StoreError
from certd.core.rotation import Journal, Step
from certd.crypto import certcheck, keys
from certd.engine import adopt, attempts, keyage, releases
from certd.engine.lifecycle import VersionStatus
from certd.engine.failover import Failover, NothingResumed
from certd.engine.orders import Orders, crash_at
from certd.engine.outcome import Outcome, RenewRequest, Result, with_resumed
from certd.engine.planning import Planner
from certd.engine.ports import Ports, Progress, Say, sayer
from certd.engine.rotations import Rotations
from certd.engine.attempts import CertState
from certd.ops.log import event
from certd.store.files import StoredVersion
from certd.store.port import VersionInfo

log = logging.getLogger("certd")

#: fault-injection point (``CERTD_CRASH_AT``): the new version is stored, no rotation journal or
#: release points to it yet
CRASH_STORED = "version_stored"


class Renew:
    """The renew use case over ``ports`` (state and decisions through ``planner``)."""

    def __init__(self, ports: Ports, planner: Planner) -> None:
        self.ports, self.planner = ports, planner
        self.rotations = Rotations(ports, planner)
        self.orders = Orders(ports)
        self.failover = Failover(ports, self.orders)

    def __call__(self, req: RenewRequest, progress: Progress | None = None) -> Outcome:
        """Renew ``req.cert`` if due (now, if forced); never raises for a CertdError."""
        say = sayer(req.name, progress)
        try:
            asked_at = self.ports.store.current(req.name) if req.force else None
            with self.ports.lock(req.name):
                resumed = self.rotations.resume(req.cert, say)
                now = self.ports.store.current(req.name)
                in_release = releases.blocking_release(self.ports, req.cert)  # one release at a time
                if in_release is not None:
                    return in_release
                if req.force and not req.resume_only and resumed is None and now != asked_at:
                    # Another process (in a fleet, another node) renewed it while this one waited
                    # for the lease: that was the new certificate asked for; no second order.
                    return Outcome(req.name, Result.NOT_DUE, f"renewed meanwhile by another process or node: "
                                   f"version {now} is current", now)
                outcome = self.locked(req, say)
                return outcome if resumed is None else with_resumed(outcome, resumed)
        except StoreError as e:
            # The lease itself could not be written (a full or read-only state disk), or the
            # stored certificate's key cannot be opened (its KEK's token pulled): a failed attempt
            # like any other, so it is backed off (kept in memory if the state cannot be saved
            # either), not retried at once for ever (a plan() with no failure counted polls ARI
            # "now" again). Nothing was ordered: issuance records its own failures.
            try:
                state = self.planner.load_state(req.name)
                self.rotations.record_failure(req.cert, state, str(e), initiator=req.initiator, reason=req.reason,
                                              exc=e)
            except CertdError:
                event(log, "renewal_failed", logging.ERROR, name=req.name, error=str(e))
                return Outcome(req.name, Result.FAILED, str(e))
            return Outcome(req.name, Result.FAILED, state.last_error or str(e))
        except CertdError as e:
            event(log, "renewal_failed", logging.ERROR, name=req.name, error=str(e))
            return Outcome(req.name, Result.FAILED, str(e))

    def locked(self, req: RenewRequest, say: Say) -> Outcome:
        """The renewal, for a caller that holds the certificate's lock (revoke renews under it)."""
        cert, store = req.cert, self.ports.store
        self.ports.edges.check_safe(cert)  # before any order: no hook of others, no wasted issuance
        current = store.current(cert.name)
        stored = store.load(cert.name, current) if current is not None else None
        state = self.planner.load_state(cert.name)
        old_serial = stored.bundle.info.serial if stored else None
        reason, initiator = req.reason, req.initiator
        orphaned = adopt.orphan(self.ports, cert, current) if not req.fresh_key else None
        if orphaned is not None:  # stored by a renewal that died before its rotation: no second order
            return self._roll_out_orphan(cert, current, state, orphaned, say)
        if req.resume_only:
            return self._resume(req, stored, state, say)
        if not req.force:
            decision = self.planner.decide(cert, stored, state, refresh_ari=True, ignore_failures=req.skip_backoff)
            due = decision.is_due(self.ports.clock.now())
            event(log, "renewal_decision", name=cert.name, renew_at=isoformat(decision.renew_at),
                  reason=decision.reason, due=due)
            if not due:
                return Outcome(cert.name, Result.NOT_DUE,
                               f"renews at {isoformat(decision.renew_at)}: {decision.reason}", current, old_serial)
            reason = reason or decision.reason
            if decision.ca_requested and initiator == "scheduler":
                initiator = "ari"  # the CA asked (ARI window in the past), not our own schedule
            found = adopt.lapsed(self.ports, cert, current)
            if found is not None:  # a node stored this renewal's certificate and died: no second order
                return self._adopt(cert, state, *found, say)
        else:
            refusal = self._forced(req, state, current, old_serial, say)
            if refusal is not None:
                return refusal
        return self._issue_and_roll_out(cert, stored, state, reason, initiator, req.force, say)

    def _adopt(self, cert: CertificateConfig, state: CertState, node: str, lapsed: Journal, say: Say) -> Outcome:
        """Roll out the version ``node`` stored for this renewal and left (see :mod:`certd.engine.adopt`)."""
        started = self.ports.clock.monotonic()
        adopt.take_over(self.ports, node, lapsed)
        say(f"rolling out version {lapsed.to_version}, which node {node} stored and did not roll out")
        j = self.rotations.start(cert, "renew", lapsed.from_version, lapsed.to_version, lapsed.initiator,
                                 lapsed.reason)
        j = self.rotations.drive(cert, j, say)
        return self.rotations.finish(cert, j, state, self.ports.clock.monotonic() - started)

    def _roll_out_orphan(self, cert: CertificateConfig, current: int | None, state: CertState, orphan: VersionInfo,
                         say: Say) -> Outcome:
        """Roll out as this renewal the version a renewal stored and died before rolling out (see
        :func:`certd.engine.adopt.orphan`): the CA issued it for this renewal already."""
        started = self.ports.clock.monotonic()
        initiator, reason = adopt.adopt_orphan(self.ports, cert, current, orphan)
        say(f"rolling out version {orphan.version} (serial {orphan.info.serial}), which an interrupted renewal "
            f"stored and did not roll out; nothing ordered")
        attempts.note_issued(state, cert.identifiers, self.ports.clock.now())  # its state was never saved
        return self._roll_out(cert, state, current, orphan.version, orphan.info.serial, initiator, reason, started,
                              say, journaled=True)

    def _resume(self, req: RenewRequest, stored: StoredVersion | None, state: CertState, say: Say) -> Outcome:
        """Finish the order another process journaled, under the lease: never a fresh order, and
        not before a failed attempt's backoff ends (the fleet's reconcile passes ask every 30 s)."""
        cert = req.cert
        current = stored.version if stored is not None else None
        serial = stored.bundle.info.serial if stored is not None else None
        if self.ports.store.load_order(cert.name) is None:  # no order left: a stored version, maybe
            found = adopt.lapsed(self.ports, cert, current)
            if found is not None:
                return self._adopt(cert, state, *found, say)
            return Outcome(cert.name, Result.NOT_DUE, "nothing a stopped node left to finish", current, serial)
        now = self.ports.clock.now()
        waits = [t for t in (attempts.blocked_until(state, now), self.planner.failure_retry_at(stored, state))
                 if t is not None and t > now]
        if waits:
            return Outcome(cert.name, Result.NOT_DUE, f"the journaled order is tried again at {isoformat(max(waits))} "
                                                      f"(after {state.failures} failed attempt(s))", current, serial)
        return self._issue_and_roll_out(cert, stored, state, req.reason, req.initiator, False, say, resume_only=True)

    def _forced(self, req: RenewRequest, state: CertState, current: int | None, old_serial: str | None,
                say: Say) -> Outcome | None:
        """A forced renewal's checks and its ``forced`` event; the refusal, if refused."""
        now = self.ports.clock.now()
        refusal = None if req.ignore_duplicate_limit else attempts.duplicate_refusal(state, req.cert.identifiers, now)
        if refusal is not None:
            return Outcome(req.name, Result.REFUSED, f"not renewing {req.name}: {refusal}", current, old_serial)
        detail: dict[str, Any] = {}
        until = attempts.blocked_until(state, now)
        if until is not None:  # the operator says "fixed, try now": bypass the hold once, on record
            detail["bypassed"] = {"failure_kind": state.failure_kind, "problem": state.problem,
                                  "retry_after": isoformat(until)}
            say(f"trying now although {state.failure_kind} until {isoformat(until)} (forced)")
        self.ports.emit("forced", req.name, initiator=req.initiator, reason=req.reason, outcome="requested",
                        old_serial=old_serial, version=current, detail=detail)
        return None

    def _issue_and_roll_out(self, cert: CertificateConfig, stored: StoredVersion | None, state: CertState,
                            reason: str, initiator: str, force: bool, say: Say, *,
                            resume_only: bool = False) -> Outcome:
        ports, clock = self.ports, self.ports.clock
        current = stored.version if stored is not None else None
        started = clock.monotonic()
        state.last_attempt = isoformat(clock.now())
        try:  # the order journal: an order a crash interrupted is resumed, not placed again
            issued, tried = self.failover.obtain(cert, stored, state, lambda: self._key_for(cert, stored, say),
                                                 _replaces(stored, cert), say, ignore_waits=force,
                                                 resume_only=resume_only)
            key_pem, replaces = issued.key_pem, issued.replaces
            bundle = certcheck.check_issued(issued.fullchain, key_pem, cert.identifiers, clock.now())
            info = bundle.info
            say(f"issued serial {info.serial}, not after {isoformat(info.not_after)}")
            version = ports.store.add_version(cert.name, bundle, {
                "created": isoformat(clock.now()), "initiator": initiator, "reason": reason,
                "serial": info.serial, "not_after": isoformat(info.not_after),
                "fingerprint_sha256": info.fingerprint_sha256, "replaces": replaces,
                keyage.KEY_CREATED: self._key_created(stored, info.spki_sha256),
                **({"profile": issued.profile} if issued.profile else {}),
                **({"ca": issued.ca, "ca_directory": _directory(ports, issued.ca)} if issued.ca else {}),
                **({"ca_skipped": tried.skipped} if tried.skipped else {}),
            })
        except NothingResumed as e:
            return Outcome(cert.name, Result.NOT_DUE, str(e), current)
        except OperationFailed as e:
            self.orders.failed(cert.name, e)
            if force:  # the operator asked for a new certificate: retried on the backoff until one comes
                state.forced_retry = reason or "forced"
            self.rotations.record_failure(cert, state, str(e), ca_unreachable=isinstance(e, CANotReachable),
                                          initiator=initiator, reason=reason, exc=e)
            return Outcome(cert.name, Result.FAILED,
                           attempts.next_step(str(e), cert.name, state, clock.now(), ports.retries), current)
        attempts.note_issued(state, cert.identifiers, clock.now())
        event(log, "cert_issued", name=cert.name, version=version, serial=info.serial,
              not_after=isoformat(info.not_after), initiator=initiator)
        ports.emit("issued", cert.name, initiator=initiator, reason=reason, version=version, new_serial=info.serial,
                   old_serial=stored.bundle.info.serial if stored else None, spki_sha256=info.spki_sha256,
                   not_after=info.not_after, duration=clock.monotonic() - started,
                   detail=_issued_detail(issued.profile, issued.ca, tried.skipped))
        return self._roll_out(cert, state, current, version, info.serial, initiator, reason, started, say,
                              journaled=issued.journaled)

    def _roll_out(self, cert: CertificateConfig, state: CertState, current: int | None, version: int, serial: str,
                  initiator: str, reason: str, started: float, say: Say, *, journaled: bool) -> Outcome:
        """Release the stored ``version`` or roll it out. The order journal is cleared only once
        a release or a rotation journal points to the version: until then it is what lets the
        next attempt find the version (:func:`certd.engine.adopt.orphan`) instead of ordering
        again, should this process die or the database stop in between."""
        crash_at(CRASH_STORED)
        released = releases.open_release(self.ports, self.planner, cert, state, current, version, serial, initiator,
                                         reason)
        if released is not None:  # [certificate.rollout] in a fleet: the canaries deploy it first
            self.orders.stored(cert.name, journaled)
            return released
        j = self.rotations.start(cert, "renew", current, version, initiator, reason)
        self.orders.stored(cert.name, journaled)
        rotation.crash_point(Step.ISSUED)
        j = self.rotations.drive(cert, j, say)
        return self.rotations.finish(cert, j, state, self.ports.clock.monotonic() - started)

    def _key_for(self, cert: CertificateConfig, stored: StoredVersion | None, say: Say) -> bytes:
        """The stored key again (``reuse_key``, same type, not compromised, not too old for
        ``max_key_age``), else a fresh one."""
        if cert.reuse_key and stored is not None and stored.bundle.info.key_type == cert.key_type \
                and not VersionStatus.from_meta(stored.meta).key_compromised \
                and not self._key_too_old(cert, stored, say):
            return stored.bundle.key_pem
        return keys.generate_private_key(cert.key_type)

    def _key_too_old(self, cert: CertificateConfig, stored: StoredVersion, say: Say) -> bool:
        """Whether ``max_key_age`` forbids reusing ``stored``'s key now (said and logged if so)."""
        if cert.max_key_age is None:
            return False
        now, info = self.ports.clock.now(), stored.bundle.info
        why = policy.needs_new_key(keyage.key_created(stored.meta, info), timedelta(seconds=cert.max_key_age),
                                   now, now - info.not_before)
        if why is None:
            return False
        why = f"{why} ({keyage.rule(cert, 'max_key_age')})"
        say(f"new key although reuse_key is on: {why}")
        event(log, "key_replaced", name=cert.name, version=stored.version, reason=why)
        return True

    def _key_created(self, stored: StoredVersion | None, spki_sha256: str) -> str:
        """The new version's ``key_created``: the previous one's when it reuses that key, else now."""
        if stored is not None and stored.bundle.info.spki_sha256 == spki_sha256:
            return isoformat(keyage.key_created(stored.meta, stored.bundle.info))
        return isoformat(self.ports.clock.now())


def _directory(ports: Ports, ca: str) -> str | None:
    """The directory URL of CA ``ca``: recorded beside its name, so the version still finds its
    CA (ARI, replaces, revoke) after the [[ca]] table is renamed."""
    found = ports.config.ca_config(ca)
    return found.directory if found is not None else None


def _issued_detail(profile: str | None, ca: str | None, skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The ``issued`` event's detail: the profile asked for, the issuing CA, the CAs skipped."""
    return {**({"profile": profile} if profile else {}), **({"ca": ca} if ca else {}),
            **({"ca_skipped": skipped} if skipped else {})}


def _replaces(stored: StoredVersion | None, cert: CertificateConfig) -> str | None:
    """The ARI id the new order replaces (RFC 9773 §5); none when the configured names
    differ from the stored certificate's (a CA refuses replaces for other identifiers)."""
    if stored is None or set(stored.bundle.info.identifiers) != set(cert.identifiers):
        return None
    from certd.acme.ari import ari_cert_id  # here: the ACME client loads only where an order happens
    try:
        return ari_cert_id(stored.bundle.cert_pem)
    except (ValueError, TypeError):  # no AKI: the CA cannot have ARI for it
        return None


def renew_all(renew: Renew, requests: Iterable[RenewRequest], workers: int,
              progress: Progress | None = None) -> list[Outcome]:
    """Run ``renew`` for each request, up to ``workers`` at a time; one failure (even a bug)
    does not stop the others. Outcomes come back in the order of ``requests``."""
    requests = list(requests)
    workers = max(1, min(workers, len(requests)))
    if workers > 1 and progress is not None:
        progress = _serialized(progress)

    def one(req: RenewRequest) -> Outcome:
        try:
            return renew(req, progress)
        except Exception as e:  # a bug in one renewal must not lose the others' outcomes
            log.exception("renewal of %s crashed", req.name)
            return Outcome(req.name, Result.FAILED, f"internal error: {type(e).__name__}: {e}")

    if workers == 1:
        return [one(r) for r in requests]
    renew.ports.issuer()  # built once here, not raced for by the workers
    return bounded_map(one, requests, workers, thread_name_prefix="certd-renew")


def _serialized(progress: Progress) -> Progress:
    """``progress`` for several threads: one message at a time (lines never interleave)."""
    lock = threading.Lock()

    def say(name: str, message: str) -> None:
        with lock:
            progress(name, message)
    return say
