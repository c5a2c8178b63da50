"""Revoking a certificate at the CA (RFC 8555 §7.6), and what a compromised key demands.

``certd revoke NAME --reason R`` revokes the current certificate with the account key, then:

- ``keyCompromise`` (RFC 5280 code 1): every stored version with that key (several, with
  ``reuse_key``) is marked ``key_compromised`` and revoked; a renewal through the whole pipeline
  (issue, stage, switch, reload, verify) follows at once with a fresh key (``Manager._key_for``
  never reuses a compromised one, and rollback refuses such versions); once the new
  certificate is committed, every copy of the old key is zeroed and removed: the store's
  versions and every deploy target's old, staged and ``.certd-prev`` copies.
  If the renewal fails (and rolled back), the servers still use the old key, so nothing is
  destroyed yet: the next successful renewal of the certificate does it
  (:func:`destroy_compromised_keys` runs after every commit).
- ``superseded`` (4) and ``affiliationChanged`` (3): renewed first (the usual key rules), then
  the old certificate is revoked, so no moment serves a revoked certificate; if the renewal
  fails, the old one is not revoked (it is still in service) and the command fails.
- ``cessationOfOperation`` (5): revoked only. The version is marked, and the scheduler holds
  off (after a revocation ARI asks for renewal at once) until ``renew --force`` or until the
  certificate is removed from the configuration.

A revoked version is never deployed again (rollback refuses it). Each revocation emits a
``revoked`` event, each key destruction a ``key_destroyed`` event (the audit log keeps them).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from certd.deploy import stage as deploy
from certd.core.clock import isoformat
from certd.config import CertificateConfig
from certd.core.errors import CertdError, OperationFailed, UsageError
from certd.ops.log import event
from certd.store.files import StoredVersion

if TYPE_CHECKING:
    from certd.engine.manager import Manager, Outcome

log = logging.getLogger("certd.revocation")

# RFC 5280 §5.3.1 CRLReason codes that an ACME subscriber may reasonably choose.
REASONS: dict[str, int] = {"keyCompromise": 1, "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5}
CEASED = "cessationOfOperation"


def parse_reason(text: str) -> str:
    """The canonical reason name for ``text`` (case-insensitive); UsageError otherwise."""
    for name in REASONS:
        if name.lower() == text.strip().lower():
            return name
    raise UsageError(f"unknown revocation reason {text!r}; expected one of {', '.join(REASONS)}")


def is_held(meta: dict[str, Any]) -> str | None:
    """Why the scheduler must not renew this (current) version, or None."""
    rev = meta.get("revoked")
    if isinstance(rev, dict) and rev.get("reason") == CEASED:
        return (f"revoked ({CEASED}) by {rev.get('initiator', '?')}: not renewing; "
                f"renew --force to resume, or remove it from the configuration")
    return None


def revoke_locked(mgr: Manager, cert: CertificateConfig, reason: str, initiator: str,
                  say: Callable[[str], None], rotate: Callable[[str], Outcome]) -> Outcome:
    """Revoke ``cert``'s current certificate and follow up as the reason demands (module essay).
    The caller holds the certificate's lock; ``rotate(reason)`` runs a forced renewal under it.
    The outcome is ``revoked`` only if every step succeeded. UsageError: nothing to revoke."""
    from certd.engine.manager import Outcome

    current = mgr.store.current(cert.name)
    if current is None:
        raise UsageError(f"{cert.name} has no certificate yet; nothing to revoke")
    stored = mgr.store.load(cert.name, current)
    info = stored.bundle.info
    if info.not_after <= mgr.clock.now():
        raise UsageError(f"{cert.name}: serial {info.serial} expired at {isoformat(info.not_after)}; "
                         f"an expired certificate cannot be revoked")
    if reason == "keyCompromise":
        return _compromised(mgr, cert, stored, initiator, say, rotate)
    if reason == CEASED:
        error = _revoke_one(mgr, cert, stored, reason, initiator, say)
        if error:
            return Outcome(cert.name, "failed", f"REVOCATION FAILED: {error}", current, info.serial)
        return Outcome(cert.name, "revoked", f"revoked serial {info.serial} ({reason}); not renewed: remove it from "
                       f"the configuration, or renew --force to issue a new one", current, info.serial)
    # superseded, affiliationChanged: the replacement first, so no moment serves a revoked certificate.
    say(f"renewing first, then revoking serial {info.serial} ({reason})")
    renewed = rotate(f"{reason}: replacing serial {info.serial} before revoking it")
    if renewed.result != "renewed":
        return Outcome(cert.name, "failed", f"{renewed.message}; serial {info.serial} NOT revoked: it is still "
                       f"in service (fix the renewal, then revoke again)", renewed.version, renewed.serial)
    error = _revoke_one(mgr, cert, stored, reason, initiator, say)
    if error:
        return Outcome(cert.name, "failed", f"{renewed.message}; REVOCATION FAILED: {error}",
                       renewed.version, renewed.serial)
    return Outcome(cert.name, "revoked", f"{renewed.message}; revoked the old serial {info.serial} ({reason})",
                   renewed.version, renewed.serial)


def _compromised(mgr: Manager, cert: CertificateConfig, stored: StoredVersion, initiator: str,
                 say: Callable[[str], None], rotate: Callable[[str], Outcome]) -> Outcome:
    """keyCompromise: mark, revoke at once (every unexpired certificate with the key), re-key and
    rotate, destroy the key."""
    from certd.engine.manager import Outcome

    reason, info, now = "keyCompromise", stored.bundle.info, mgr.clock.now()
    victims = _same_key(mgr, cert.name, stored)
    for sv in victims:
        mgr.store.update_meta(cert.name, sv.version, {"key_compromised": True})
    say(f"marked the key of version{'s' if len(victims) > 1 else ''} {', '.join(str(sv.version) for sv in victims)} "
        f"compromised")
    errors = [e for sv in victims if sv.bundle.info.not_after > now   # expired ones need no revocation
              and (e := _revoke_one(mgr, cert, sv, reason, initiator, say))]
    say("renewing now with a fresh key")
    renewed = rotate(f"{reason}: serial {info.serial} revoked by {initiator}")
    parts = [f"REVOCATION FAILED: {'; '.join(errors)}" if errors else f"revoked serial {info.serial} ({reason})",
             renewed.message]
    left = [sv.version for sv in victims if not _destroyed(mgr, cert.name, sv.version)]
    if left:
        parts.append(f"the compromised key is still kept (version{'s' if len(left) > 1 else ''} "
                     f"{', '.join(map(str, left))}): it is destroyed after the next successful renewal")
    else:
        parts.append("the compromised key was destroyed in the store and every deploy target")
    ok = not errors and not left and renewed.result == "renewed"
    return Outcome(cert.name, "revoked" if ok else "failed", "; ".join(parts), renewed.version, renewed.serial)


def _revoke_one(mgr: Manager, cert: CertificateConfig, sv: StoredVersion, reason: str, initiator: str,
                say: Callable[[str], None]) -> str | None:
    info = sv.bundle.info
    say(f"revoking serial {info.serial} of version {sv.version} ({reason})")
    fields: dict[str, Any] = {"initiator": initiator, "reason": reason, "old_serial": info.serial,
                              "version": sv.version, "spki_sha256": info.spki_sha256, "not_after": info.not_after,
                              "detail": {"reason_code": REASONS[reason]}}
    try:
        mgr.issuer.revoke(sv.bundle.cert_pem, REASONS[reason])
    except OperationFailed as e:
        mgr.emit("revoked", cert.name, outcome="failed", **{**fields, "detail": {**fields["detail"], "error": str(e)}})
        return f"serial {info.serial}: {e}"
    mgr.store.update_meta(cert.name, sv.version, {"revoked": {
        "reason": reason, "code": REASONS[reason], "time": isoformat(mgr.clock.now()), "initiator": initiator}})
    mgr.emit("revoked", cert.name, **fields)
    return None


def _same_key(mgr: Manager, name: str, stored: StoredVersion) -> list[StoredVersion]:
    """Every stored version whose certificate has ``stored``'s public key (``stored`` first)."""
    spki = stored.bundle.info.spki_sha256
    others = [mgr.store.load(name, v) for v in mgr.store.versions(name) if v != stored.version]
    return [stored] + [sv for sv in others if sv.bundle.info.spki_sha256 == spki]


def _destroyed(mgr: Manager, name: str, version: int) -> bool:
    if version not in mgr.store.versions(name):
        return True  # pruned: its key was zeroed with it
    return bool(mgr.store.load(name, version).meta.get("key_destroyed"))


def destroy_compromised_keys(mgr: Manager, cert: CertificateConfig, initiator: str = "certd") -> list[int]:
    """Zero and remove every copy of a compromised key that the live version no longer uses:
    the deploy targets' copies first, then the store's. Called after every commit (so a re-key
    that failed at first is finished by the next successful renewal); caller holds the lock.
    Returns the store versions whose key was destroyed; a failure is logged and audited, never
    raised (the renewal that called it has committed)."""
    name = cert.name
    current = mgr.store.current(name)
    live_spki = mgr.store.load(name, current).bundle.info.spki_sha256 if current is not None else None
    pending = [sv for sv in (mgr.store.load(name, v) for v in mgr.store.versions(name))
               if sv.meta.get("key_compromised") and not sv.meta.get("key_destroyed")
               and sv.bundle.info.spki_sha256 != live_spki]
    if not pending:
        return []
    try:
        files = deploy.destroy_keys(cert, {sv.bundle.key_pem for sv in pending})
        for sv in pending:
            mgr.store.destroy_key(name, sv.version)
    except CertdError as e:  # the commit stands; the next one tries again
        event(log, "key_destroy_failed", logging.ERROR, name=name, error=str(e))
        mgr.emit("key_destroyed", name, initiator=initiator, reason="keyCompromise", outcome="failed",
                 spki_sha256=pending[-1].bundle.info.spki_sha256, detail={"error": str(e)})
        return []
    by_key: dict[str, list[StoredVersion]] = {}
    for sv in pending:
        by_key.setdefault(sv.bundle.info.spki_sha256, []).append(sv)
    for spki, svs in by_key.items():
        latest = svs[-1]
        mgr.emit("key_destroyed", name, initiator=initiator, reason="keyCompromise", spki_sha256=spki,
                 old_serial=latest.bundle.info.serial, version=latest.version,
                 detail={"versions": [sv.version for sv in svs], "deployed_copies": len(files)})
    return [sv.version for sv in pending]
