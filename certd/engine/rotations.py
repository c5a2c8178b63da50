"""Driving one rotation journal to its end and recording how it ended: what renew, roll back
and recovery share.

:meth:`Rotations.drive` runs the state machine of :mod:`certd.core.rotation` over the Edges
port, saying each step and emitting the lifecycle events an operator cares about;
:meth:`Rotations.finish` turns the final journal into an :class:`Outcome`, updates the
certificate's state, prunes old versions and destroys compromised keys after a commit;
:meth:`Rotations.resume` finishes a rotation a crash left unfinished. The caller holds the
certificate's lock throughout.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from typing import Any

from certd.config import CertificateConfig
from certd.core import rotation
from certd.core.clock import isoformat
from certd.core.errors import CertdError, StoreError
from certd.core.model import CertInfo
from certd.core.rotation import Journal, Step
from certd.engine import attempts, releases
from certd.engine.compromise import destroy_compromised_keys
from certd.engine.destruction import destroy_retired_keys
from certd.engine.effects import STEP_TEXT, failed_step, idle_actions
from certd.engine.outcome import Outcome, Result, rollback_failed_message
from certd.engine.planning import Planner
from certd.engine.ports import Ports, Say
from certd.engine.statebook import adopt, carry_notes
from certd.engine.attempts import CertState
from certd.ops.log import event

log = logging.getLogger("certd")

#: journal ``extra`` key: False from the start until the rotation's committed end is audited
#: (``renewed`` / ``operator_rollback``); a committed journal still False is recorded on resume
RECORDED = "recorded"


def unrecorded(j: Journal) -> bool:
    """Whether ``j`` committed and its process died before auditing it."""
    return j.step == Step.COMMITTED and j.extra.get(RECORDED) is False


def to_resume(j: Journal | None) -> bool:
    """Whether start-up recovery has something to finish in ``j``."""
    return j is not None and (not j.finished or unrecorded(j))


class Rotations:
    """Journals of one certificate store, driven over ``ports``; state kept through ``planner``."""

    def __init__(self, ports: Ports, planner: Planner) -> None:
        self.ports, self.planner = ports, planner

    def start(self, cert: CertificateConfig, kind: str, from_version: int | None, to_version: int,
              initiator: str, reason: str) -> Journal:
        """A new journal, saved before anything is done (a crash from here on resumes it)."""
        j = rotation.start(cert.name, kind, from_version, to_version, self.ports.clock.now(),
                           initiator=initiator, reason=reason)
        j = replace(j, extra={**j.extra, RECORDED: False})  # True once its end is audited
        self.save_journal(j)
        return j

    def drive(self, cert: CertificateConfig, j: Journal, say: Say) -> Journal:
        """Run ``j`` to a terminal step, saying and auditing each step on the way."""
        def on_step(jj: Journal) -> None:
            event(log, f"rotation_{jj.step.value}", name=jj.name, version=jj.to_version,
                  kind=jj.kind, error=jj.error if jj.step in (Step.ROLLING_BACK, Step.FAILED) else None)
            text = STEP_TEXT.get(jj.step, jj.step.value)
            if jj.step == Step.VERIFIED and not cert.verify:
                text = "no [[certificate.verify]] endpoints: the live handshake was not checked"
            say(text.format(j=jj))
            self._emit_step(cert, jj)
        effects = releases.rotation_effects(self.ports, cert, j, self.ports.edges.effects(cert))
        return rotation.drive(j, effects, self.save_journal, self.ports.clock, on_step, idle=idle_actions(cert))

    def resume(self, cert: CertificateConfig, say: Say) -> Journal | None:
        """Finish a rotation that a crash left unfinished (see certd/core/rotation.py for the rule)."""
        j = self.load_journal(cert.name)
        if j is not None and unrecorded(j):
            self._record_late(cert, j)
            return None
        if j is None or j.finished:
            return None
        current = self.ports.store.current(cert.name)
        if current not in (j.from_version, j.to_version):
            # The desired version moved on while this node was away (another node adopted or
            # replaced this renewal, an operator rolled back): finishing it would move the
            # desired version back. The fleet's reconciler deploys the desired one here.
            event(log, "rotation_superseded", logging.WARNING, name=cert.name, step=j.step.value,
                  version=j.to_version, current=current)
            say(f"not resuming the {j.kind} to version {j.to_version}: version {current} is desired now")
            self.save_journal(replace(j, step=Step.FAILED, error=f"superseded: version {current} is desired"))
            return None
        event(log, "rotation_resumed", logging.WARNING, name=cert.name, step=j.step.value, version=j.to_version)
        say(f"resuming an unfinished {j.kind} at step {j.step.value}")
        j = self.drive(cert, j, say)
        self.finish(cert, j, self.planner.load_state(cert.name), 0.0)
        return j

    def _record_late(self, cert: CertificateConfig, j: Journal) -> None:
        """Audit the committed ``j`` whose process died before its record (a SIGKILL in the fleet
        soak): the renewal happened. Only the record and the mark: the state, pruning and key
        destruction belong to whatever came since (another node's later renewal, a hold the CA
        put on it), and a version pruned meanwhile still gets its record, without a serial."""
        event(log, "rotation_recorded_late", logging.WARNING, name=cert.name, version=j.to_version)
        info = self.info(cert.name, j.to_version)
        self.ports.emit("renewed" if j.kind == "renew" else "operator_rollback", cert.name,
                        detail={"recorded_late": True, "rotation_started": j.started},
                        **self._end_fields(cert, j, j.to_version, info.serial if info else None, info))
        self._mark_recorded(j)

    def _end_fields(self, cert: CertificateConfig, j: Journal, version: int | None, serial: str | None,
                    info: CertInfo | None) -> dict[str, Any]:
        """The audit fields of ``j``'s committed end at ``version`` (``renewed``, ``operator_rollback``)."""
        return {"initiator": j.initiator, "reason": j.reason, "version": version, "new_serial": serial,
                "old_serial": self.serial(cert.name, j.from_version),
                "spki_sha256": info.spki_sha256 if info else None, "not_after": info.not_after if info else None}

    def _mark_recorded(self, j: Journal) -> None:
        """Say in ``j`` that its committed end is audited (no fsync of its own: a power loss may
        record it twice, never not at all). A store out of reach here is logged, not a failure
        of the renewal: the record is written (or spooled); the next run may record it again."""
        when = isoformat(self.ports.clock.now()) or ""
        try:  # a history entry of its own: the file store's lazy journal.next is read only when it is longer
            self.save_journal(replace(j, extra={**j.extra, RECORDED: True}, history=j.history + (("recorded", when),)))
        except StoreError as e:
            event(log, "rotation_mark_not_saved", logging.WARNING, name=j.name, version=j.to_version, error=str(e))

    def finish(self, cert: CertificateConfig, j: Journal, state: CertState, seconds: float) -> Outcome:
        """The outcome of the finished ``j``, with the state, audit and housekeeping it implies."""
        version = j.to_version if j.step == Step.COMMITTED or j.unverified else j.from_version
        # read strictly (a StoreError propagates): the outcome must not name a version it cannot read
        serial = self.ports.store.load_info(cert.name, version).info.serial if version is not None else None
        if j.step == Step.COMMITTED:
            return self._committed(cert, j, state, version, serial, seconds)
        error = j.error or "unknown error"
        if j.step == Step.ROLLED_BACK:
            result = Result.ROLLED_BACK
            msg = f"rolled back to version {j.from_version} (serial {serial}, verified): {error}"
        elif j.step == Step.ROLLBACK_FAILED:
            result, msg = Result.ROLLBACK_FAILED, rollback_failed_message(j)
        elif j.unverified:
            result, msg = Result.DEPLOYED_UNVERIFIED, f"deployed version {version} but could not verify it: {error}"
        else:
            result, msg = Result.FAILED, error
        if j.kind == "renew":
            self.record_failure(cert, state, msg, result=j.result, failed_step=failed_step(j),
                                initiator=j.initiator, reason=j.reason)
        return Outcome(cert.name, result, msg, version, serial)

    def _committed(self, cert: CertificateConfig, j: Journal, state: CertState, version: int | None,
                   serial: str | None, seconds: float) -> Outcome:
        # The audit record first: the version is committed, whatever happens next. Pruning and
        # key destruction write to the store, and a fleet's database stopping right after a
        # commit (the fleet soak) left a committed renewal with no 'renewed' record at all.
        fields = {**self._end_fields(cert, j, version, serial, self.info(cert.name, version)), "duration": seconds}
        renewed = j.kind == "renew"
        if renewed:
            result, msg = Result.RENEWED, f"renewed: version {version}, serial {serial} ({seconds:.2f}s)"
            self.ports.emit("renewed", cert.name, detail=self._ca_detail(cert.name, version), **fields)
        else:
            result, msg = Result.SWITCHED, f"rolled back to version {version}, serial {serial}; verified"
            self.ports.emit("operator_rollback", cert.name, **fields)
        if j.extra.get(RECORDED) is False:
            self._mark_recorded(j)
        self.prune(cert, j.initiator)
        destroy_compromised_keys(self.ports, cert, j.initiator)
        destroy_retired_keys(self.ports, cert, j.initiator)  # destroy_after (key classes)
        now, notes = self.ports.clock.now(), carry_notes(state)

        def change(s: CertState) -> None:  # a renewal's success fields; a rollback's last_result
            if renewed:
                notes(s)
                s.failures, s.last_error, s.ari, s.ca_unreachable = 0, None, None, False
                attempts.clear(s)
                s.last_success = isoformat(now)
            s.last_result = j.result
        adopt(state, self.planner.update_state(cert.name, change))
        return Outcome(cert.name, result, msg, version, serial)

    def record_failure(self, cert: CertificateConfig, state: CertState, error: str, result: str = "failed",
                       ca_unreachable: bool = False, failed_step: str | None = None,
                       initiator: str = "scheduler", reason: str = "", exc: BaseException | None = None) -> None:
        """Count a failed renewal in ``state`` (kind, hold, next try) and audit it; the state is
        saved if the store takes it (a full disk must not hide the failure itself)."""
        now = self.ports.clock.now()
        event(log, "renewal_failed", logging.ERROR, name=cert.name, failures=state.failures + 1, error=error)
        detail: dict[str, Any] = {"failures": state.failures + 1, "error": error}
        if failed_step is not None:
            detail["failed_step"] = failed_step
        detail.update(attempts.problem_detail(exc))
        # reason: why the renewal was asked for (the operator's --reason); the error goes in detail
        self.ports.emit("renewal_failed", cert.name, outcome=result, reason=reason, detail=detail, initiator=initiator)
        notes = carry_notes(state)

        def change(s: CertState) -> None:  # the failure fields (and the renewal's notes) only
            notes(s)
            s.ca_unreachable = ca_unreachable
            s.failures += 1
            s.last_failure, s.last_error, s.last_result = isoformat(now), error, result
            attempts.note_failure(s, exc, now, timedelta(0))
            s.last_error = attempts.next_step(error, cert.name, s, now, self.ports.retries)
        try:
            adopt(state, self.planner.update_state(cert.name, change))
        except StoreError as e:
            event(log, "state_not_saved", logging.WARNING, name=cert.name, error=str(e))
            change(state)  # the caller's state says it anyway; the planner keeps it as the floor
        rule = attempts.classify(exc)
        if rule.kind != "transient":
            event(log, "renewal_blocked", logging.WARNING, name=cert.name, kind=rule.kind, problem=state.problem,
                  retry_after=state.retry_after, cite=rule.cite)

    def prune(self, cert: CertificateConfig, initiator: str = "scheduler") -> None:
        """Keep ``keep_versions`` versions (and the current one) in the store and deploy targets."""
        store = self.ports.store
        current = store.current(cert.name)
        versions = store.versions(cert.name)
        infos = {v: self.info(cert.name, v) for v in versions} if len(versions) > cert.keep_versions else {}
        removed = store.prune(cert.name, cert.keep_versions, protect={current} if current else ())
        self.ports.edges.prune(cert, self._deployed_keep(store.versions(cert.name), current))
        if removed:
            event(log, "versions_pruned", name=cert.name, versions=",".join(map(str, removed)))
        for v in removed:  # the SPKI hash says which key went with it (zeroed)
            info = infos.get(v)
            self.ports.emit("version_pruned", cert.name, version=v, reason=f"keep_versions = {cert.keep_versions}",
                            initiator=initiator, old_serial=info.serial if info else None,
                            spki_sha256=info.spki_sha256 if info else None)

    def _deployed_keep(self, stored: list[int], current: int | None) -> set[int]:
        """The versions the deploy targets keep: every stored one, or with ``[keys]`` (keys
        sealed at rest) only the current one and the previous one (what a rollback needs at
        once), so plain copies of older keys do not outlive their sealed originals. An older
        version rolled back to is staged again from the store."""
        if self.ports.config.keys is None or current is None:
            return set(stored)
        previous = max((v for v in stored if v < current), default=None)
        return {current} | ({previous} if previous is not None else set())

    def _emit_step(self, cert: CertificateConfig, j: Journal) -> None:
        """Lifecycle events for the journal steps an operator cares about."""
        common: dict[str, Any] = {"initiator": j.initiator, "reason": j.reason}
        if j.step == Step.VERIFIED and not cert.verify:
            return  # nothing was checked: the audit log must not say "verified"
        if j.step in (Step.SWITCHED, Step.VERIFIED):
            kind = "deployed" if j.step == Step.SWITCHED else "verified"
            self.ports.emit(kind, cert.name, version=j.to_version, new_serial=self.serial(cert.name, j.to_version),
                            old_serial=self.serial(cert.name, j.from_version), **common)
        elif j.step in (Step.ROLLED_BACK, Step.ROLLBACK_FAILED):
            # serials from the new version back to the old
            detail: dict[str, Any] = {"error": j.error}
            if j.step == Step.ROLLBACK_FAILED:
                detail["rollback_error"] = j.rollback_error
            detail["failed_step"] = failed_step(j)
            self.ports.emit(j.step.value, cert.name, outcome=j.step.value, version=j.from_version,
                            old_serial=self.serial(cert.name, j.to_version),
                            new_serial=self.serial(cert.name, j.from_version), detail=detail, **common)

    # -- reading the store ------------------------------------------------------------------

    def info(self, name: str, version: int | None) -> CertInfo | None:
        """The facts of a stored version (no PEM files, no key), None if it cannot be read."""
        if version is None:
            return None
        try:
            return self.ports.store.load_info(name, version).info
        except CertdError:
            return None

    def _ca_detail(self, name: str, version: int | None) -> dict[str, Any]:
        """Which CA issued ``version`` and which CAs were skipped on the way, and why (its meta)."""
        try:
            meta = self.ports.store.load_info(name, version).meta if version is not None else {}
        except CertdError:
            return {}
        return {k: meta[k] for k in ("ca", "ca_skipped") if meta.get(k)}

    def serial(self, name: str, version: int | None) -> str | None:
        info = self.info(name, version)
        return info.serial if info else None

    def load_journal(self, name: str) -> Journal | None:
        d = self.ports.store.load_journal(name)
        return Journal.from_json(d) if d else None

    def save_journal(self, j: Journal) -> None:
        self.ports.store.save_journal(j.name, j.to_json())
