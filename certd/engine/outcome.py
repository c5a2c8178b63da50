"""What the use cases are asked (:class:`RenewRequest`) and what they answer (:class:`Outcome`).

The result kinds form an enum; each member's value is the exact string users have always seen
(the CLI's output, ``--json``, the control API, ``state.json``'s ``last_result`` and the audit
log), so what is shown does not change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

from certd.config import CertificateConfig
from certd.core.rotation import Journal, Step
from certd.engine.effects import failed_step


class Result(StrEnum):
    """How one operation on one certificate ended. The value is the user-visible string."""

    RENEWED = "renewed"                          # a new version is committed (and verified, if configured)
    NOT_DUE = "not_due"                          # nothing to do (not due, nothing configured to check)
    SWITCHED = "switched"                        # deployed an existing version (rollback, redeploy)
    VERIFIED = "verified"                        # the live endpoints serve the current version
    REVOKED = "revoked"                          # revoked, and every follow-up step succeeded
    REFUSED = "refused"                          # not attempted: the request is not allowed now
    FAILED = "failed"                            # tried and failed; nothing changed on the servers
    ROLLED_BACK = "rolled_back"                  # the new version failed; the old one is served again
    ROLLBACK_FAILED = "rollback_failed"          # ... and returning to the old one failed too
    DEPLOYED_UNVERIFIED = "deployed_unverified"  # deployed, but the handshake check never passed
    CHECKED = "checked"                          # a dry run: issued by the staging CA and checked; nothing stored

    @property
    def ok(self) -> bool:
        return self in _OK


_OK = frozenset({Result.RENEWED, Result.NOT_DUE, Result.SWITCHED, Result.VERIFIED, Result.REVOKED, Result.CHECKED})


@dataclass(frozen=True)
class Outcome:
    """What happened to one certificate in one operation."""

    name: str
    result: Result
    message: str
    version: int | None = None
    serial: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "result", Result(self.result))  # a plain string is checked here

    @property
    def ok(self) -> bool:
        return self.result.ok

    def to_json(self) -> dict[str, object]:
        """The outcome as the control API and ``--json`` show it."""
        return {"name": self.name, "result": self.result.value, "message": self.message, "version": self.version,
                "serial": self.serial, "ok": self.ok}


@dataclass(frozen=True)
class RenewRequest:
    """One renewal of ``cert``. ``force``: renew whether due or not (an operator asked);
    ``skip_backoff``: the CA is known to be back, so a failure backoff no longer holds it;
    ``ignore_duplicate_limit``: a forced renewal past the CA's duplicate-certificate limit;
    ``resume_only``: finish the order a stopped process journaled, if one is still journaled
    once the lease is held, and order nothing new (a fleet node taking over a dead node's order);
    ``fresh_key``: the new certificate needs a key made now (keyCompromise), so a version an
    interrupted renewal stored (certd/engine/adopt.py, an orphan) is not rolled out instead."""

    cert: CertificateConfig
    force: bool = False
    reason: str = ""
    initiator: str = "scheduler"   # who asked: "scheduler", "uid=0(root)", ...; "ari" when the CA did
    skip_backoff: bool = False
    ignore_duplicate_limit: bool = False
    resume_only: bool = False
    fresh_key: bool = False

    @property
    def name(self) -> str:
        return self.cert.name

    @classmethod
    def resuming(cls, cert: CertificateConfig, initiator: str) -> RenewRequest:
        """Finishing another process's journaled order: not forced (a failure's backoff and
        Retry-After hold, no ``forced`` event each reconcile pass), and nothing ordered afresh."""
        return cls(cert, reason="resuming an order a stopped node journaled", initiator=initiator,
                   ignore_duplicate_limit=True, resume_only=True)


def with_resumed(outcome: Outcome, j: Journal) -> Outcome:
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
