"""Revoke: revoke a certificate at the CA (RFC 8555 §7.6), and do what the reason demands.

``certd revoke NAME --reason R`` revokes the current certificate with the account key, then:

- ``keyCompromise`` (RFC 5280 code 1): every stored version with that key (several, with
  ``reuse_key``) is marked ``key_compromised`` and revoked; a renewal through the whole pipeline
  (issue, stage, switch, reload, verify) follows at once with a fresh key (:class:`Renew` never
  reuses a compromised one, and rollback refuses such versions); once the new certificate is
  committed, every copy of the old key is zeroed and removed: the store's versions and every
  deploy target's old, staged and ``.certd-prev`` copies. If the renewal fails (and rolled
  back), the servers still use the old key, so nothing is destroyed yet: the next successful
  renewal does it (:mod:`certd.engine.compromise` runs after every commit).
  **In a fleet** the re-key is not released in steps (the whole fleet leaves the key at once);
  this node destroys the database's copy and its own, every other node destroys its copies at
  its reconcile pass once it serves the new key, and the revocation is reported complete only
  when every node that applied the certificate has, live or not, until removed (and the database
  keeps no copy): the command waits for that after
  releasing the certificate's lock, bounded by :func:`fleet_wait` (2 x ``reconcile_interval`` +
  ``verify_timeout`` + 10 s), and otherwise fails naming the nodes that still hold the key (they
  finish on their own; the ``key_compromise_complete`` audit record says when).
- ``superseded`` (4) and ``affiliationChanged`` (3): renewed first (the usual key rules), then
  the old certificate is revoked, so no moment serves a revoked certificate; if the renewal
  fails, the old one is not revoked (it is still in service) and the command fails.
- ``cessationOfOperation`` (5): revoked only. The version is marked, and the scheduler holds
  off (after a revocation ARI asks for renewal at once) until ``renew --force`` or until the
  certificate is removed from the configuration.

A revoked version is never deployed again (rollback refuses it). Each revocation emits a
``revoked`` event, each key destruction a ``key_destroyed`` event (the audit log keeps them).
The outcome is ``revoked`` only if every step succeeded, else ``failed``; UsageError when there
is nothing to revoke.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from certd.config import CertificateConfig
from certd.core.clock import isoformat
from certd.core.errors import AcmeError, CertdError, OperationFailed, UsageError
from certd.core.release import live_window
from certd.engine import compromise
from certd.engine.lifecycle import CEASED, KEY_COMPROMISE, REASONS, Revocation, compromised_meta
from certd.engine.outcome import Outcome, RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports, Progress, Say, sayer
from certd.engine.renew import Renew
from certd.ops.log import event
from certd.store.files import StoredVersion

log = logging.getLogger("certd.revocation")

_POLL = 0.5  # seconds between looks at the fleet while a keyCompromise waits for it


def fleet_interval(ports: Ports) -> float:
    """The fleet's ``reconcile_interval`` (30 s when the configuration has no ``[cluster]``)."""
    cluster = ports.config.cluster
    return cluster.reconcile_interval if cluster is not None else 30.0


def fleet_wait(reconcile_interval: float, verify_timeout: float) -> float:
    """How long ``certd revoke --reason keyCompromise`` waits for the fleet: a node that missed
    the change notification applies the new version at its next pass (one interval), verifies it
    (up to ``verify_timeout``), destroys its copies; a pass records the completion (one more
    interval, though a node's record wakes the others at once); 10 s of margin."""
    return 2 * reconcile_interval + verify_timeout + 10


class Revoke:
    """The revoke use case over ``ports``; renews through :class:`Renew` under the same lock."""

    def __init__(self, ports: Ports, planner: Planner) -> None:
        self.ports = ports
        self.renew = Renew(ports, planner)

    def __call__(self, cert: CertificateConfig, reason: str, *, initiator: str = "operator",
                 progress: Progress | None = None) -> Outcome:
        """Revoke ``cert``'s current certificate for ``reason`` (a name in REASONS)."""
        say = sayer(cert.name, progress)
        try:
            with self.ports.lock(cert.name):
                self.renew.rotations.resume(cert, say)
                outcome, spki = self._locked(cert, reason, initiator, say)
            # outside the lock: this node's own reconcile pass takes it to record its part
            return self._fleet_wide(cert, outcome, spki, say) if spki is not None else outcome
        except UsageError:
            raise
        except CertdError as e:
            event(log, "revocation_failed", logging.ERROR, name=cert.name, error=str(e))
            return Outcome(cert.name, Result.FAILED, str(e))

    def _rotate(self, cert: CertificateConfig, why: str, initiator: str, say: Say, *,
                fresh_key: bool = False) -> Outcome:
        """A forced renewal under the lock already held (``fresh_key``: keyCompromise, see RenewRequest)."""
        # not released in steps ([certificate.rollout]): a revocation moves the whole fleet off the
        # old certificate at once; an unfinished release is then superseded (certd/core/release.py)
        urgent = dataclasses.replace(cert, rollout=None)
        return self.renew.locked(RenewRequest(urgent, force=True, reason=why, initiator=initiator, fresh_key=fresh_key),
                                 say)

    def _locked(self, cert: CertificateConfig, reason: str, initiator: str,
                say: Say) -> tuple[Outcome, str | None]:
        """The revocation, and the compromised key's SPKI SHA-256 when the fleet must still be
        waited for (keyCompromise on a fleet's store, the local part done), else None."""
        store = self.ports.store
        current = store.current(cert.name)
        if current is None:
            raise UsageError(f"{cert.name} has no certificate yet; nothing to revoke")
        stored = store.load(cert.name, current)
        info = stored.bundle.info
        if info.not_after <= self.ports.clock.now():
            raise UsageError(f"{cert.name}: serial {info.serial} expired at {isoformat(info.not_after)}; "
                             f"an expired certificate cannot be revoked")
        if reason == KEY_COMPROMISE:
            outcome = self._compromised(cert, stored, initiator, say)
            fleet = outcome.result == Result.REVOKED and compromise.book(self.ports) is not None
            return outcome, info.spki_sha256 if fleet else None
        return self._other(cert, stored, reason, initiator, say), None

    def _other(self, cert: CertificateConfig, stored: StoredVersion, reason: str, initiator: str,
               say: Say) -> Outcome:
        """Every reason but keyCompromise."""
        info, current = stored.bundle.info, stored.version
        if reason == CEASED:
            error = self._revoke_one(cert, stored, reason, initiator, say)
            if error:
                return Outcome(cert.name, Result.FAILED, f"REVOCATION FAILED: {error}", current, info.serial)
            return Outcome(cert.name, Result.REVOKED, f"revoked serial {info.serial} ({reason}); not renewed: remove "
                           f"it from the configuration, or renew --force to issue a new one", current, info.serial)
        # superseded, affiliationChanged: the replacement first, so no moment serves a revoked certificate.
        say(f"renewing first, then revoking serial {info.serial} ({reason})")
        renewed = self._rotate(cert, f"{reason}: replacing serial {info.serial} before revoking it", initiator, say)
        if renewed.result != Result.RENEWED:
            return Outcome(cert.name, Result.FAILED, f"{renewed.message}; serial {info.serial} NOT revoked: it is "
                           f"still in service (fix the renewal, then revoke again)", renewed.version, renewed.serial)
        error = self._revoke_one(cert, stored, reason, initiator, say)
        if error:
            return Outcome(cert.name, Result.FAILED, f"{renewed.message}; REVOCATION FAILED: {error}",
                           renewed.version, renewed.serial)
        return Outcome(cert.name, Result.REVOKED, f"{renewed.message}; revoked the old serial {info.serial} ({reason})",
                       renewed.version, renewed.serial)

    def _compromised(self, cert: CertificateConfig, stored: StoredVersion, initiator: str, say: Say) -> Outcome:
        """keyCompromise: mark, revoke at once (every unexpired certificate with the key), re-key
        and rotate, destroy the key."""
        reason, info, now = KEY_COMPROMISE, stored.bundle.info, self.ports.clock.now()
        victims = self._same_key(cert.name, stored)
        for sv in victims:
            self.ports.store.update_meta(cert.name, sv.version, compromised_meta())
        plural = "s" if len(victims) > 1 else ""
        say(f"marked the key of version{plural} {', '.join(str(sv.version) for sv in victims)} compromised")
        errors = [e for sv in victims if sv.bundle.info.not_after > now   # expired ones need no revocation
                  and (e := self._revoke_one(cert, sv, reason, initiator, say))]
        say("renewing now with a fresh key")
        renewed = self._rotate(cert, f"{reason}: serial {info.serial} revoked by {initiator}", initiator, say,
                               fresh_key=True)
        parts = [f"REVOCATION FAILED: {'; '.join(errors)}" if errors else f"revoked serial {info.serial} ({reason})",
                 renewed.message]
        left = [sv.version for sv in victims if not compromise.key_destroyed(self.ports, cert.name, sv.version)]
        if left:
            parts.append(f"the compromised key is still kept (version{'s' if len(left) > 1 else ''} "
                         f"{', '.join(map(str, left))}): it is destroyed after the next successful renewal")
        elif compromise.book(self.ports) is not None:
            parts.append("the compromised key was destroyed in the database and this node's deploy targets")
        else:
            parts.append("the compromised key was destroyed in the store and every deploy target")
        ok = not errors and not left and renewed.result == Result.RENEWED
        return Outcome(cert.name, Result.REVOKED if ok else Result.FAILED, "; ".join(parts),
                       renewed.version, renewed.serial)

    def _fleet_wide(self, cert: CertificateConfig, outcome: Outcome, spki: str, say: Say) -> Outcome:
        """keyCompromise in a fleet: wait (bounded, :func:`fleet_wait`) until every node (not
        removed) that applied the certificate moved off the key and destroyed its copies (and the
        database's is gone); the revocation is reported complete only then, else failed with the
        nodes that still hold it."""
        interval = fleet_interval(self.ports)
        bound, clock = fleet_wait(interval, cert.verify_timeout), self.ports.clock
        deadline = clock.monotonic() + bound
        say(f"waiting up to {bound:.0f} s for every node to serve the new key and destroy the old one")
        c, error = None, ""
        while True:
            try:
                c, _ = compromise.fleet_completion(self.ports, cert.name, spki, live_window(interval))
            except CertdError as e:  # the database, for a moment: look again until the bound
                error = f" (last look failed: {e})"
            if c is not None and c.completed_at is not None:
                return dataclasses.replace(outcome, message=f"{outcome.message}; revocation complete: every node "
                                           f"({', '.join(c.nodes) or 'none'}) serves a new key and destroyed "
                                           f"the compromised one, and the database keeps no copy of it")
            if clock.monotonic() >= deadline:
                break
            clock.sleep(_POLL)
        held = (", ".join(c.holding) or "none") if c is not None else "unknown"
        store = "; the database still keeps a sealed copy" if c is not None and c.in_store else error
        return dataclasses.replace(outcome, result=Result.FAILED, message=(
            f"{outcome.message}; revocation NOT complete after {bound:.0f} s: node(s) {held} still hold the "
            f"compromised key{store}. Each destroys it at its reconcile pass once it serves the new version: "
            f"start or fix certd there (certd status --fleet shows them); a node gone for good: "
            f"certd nodes remove NODE. The key_compromise_complete audit record says when it is done"))

    def _revoke_one(self, cert: CertificateConfig, sv: StoredVersion, reason: str, initiator: str,
                    say: Say) -> str | None:
        """Revoke one version at the CA and mark it; the error text if the CA refused."""
        info = sv.bundle.info
        say(f"revoking serial {info.serial} of version {sv.version} ({reason})")
        fields: dict[str, Any] = {"initiator": initiator, "reason": reason, "old_serial": info.serial,
                                  "version": sv.version, "spki_sha256": info.spki_sha256,
                                  "not_after": info.not_after, "detail": {"reason_code": REASONS[reason]}}
        try:
            issuer = self.ports.issuer_of(sv.meta)  # revoked at the CA that issued it
            if issuer is None:
                raise AcmeError(f"it was issued by CA {sv.meta.get('ca')!r} ({sv.meta.get('ca_directory') or '?'}), "
                                "which is no longer configured: add its [[ca]] table back to revoke it there")
            issuer.revoke(sv.bundle.cert_pem, REASONS[reason])
        except OperationFailed as e:
            self.ports.emit("revoked", cert.name, outcome="failed",
                            **{**fields, "detail": {**fields["detail"], "error": str(e)}})
            return f"serial {info.serial}: {e}"
        mark = Revocation.of(reason, isoformat(self.ports.clock.now()), initiator)
        self.ports.store.update_meta(cert.name, sv.version, mark.to_meta())
        self.ports.emit("revoked", cert.name, **fields)
        return None

    def _same_key(self, name: str, stored: StoredVersion) -> list[StoredVersion]:
        """Every stored version whose certificate has ``stored``'s public key (``stored`` first)."""
        store = self.ports.store
        spki = stored.bundle.info.spki_sha256
        others = [store.load(name, v) for v in store.versions(name) if v != stored.version]
        return [stored] + [sv for sv in others if sv.bundle.info.spki_sha256 == spki]
