"""A stored version's lifecycle status (revoked, key compromised, key destroyed, held) as a
typed value, and the revocation reasons an operator may give.

On disk nothing changes: the status is read from, and written to, the same keys of the
version's ``meta`` as before (``revoked: {reason, code, time, initiator}``, ``key_compromised:
true``, ``key_destroyed: true``, the last written by :meth:`Store.destroy_key`). This module
is the only one that knows those keys. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from certd.core.errors import UsageError
from certd.core.release import bad_reason

# RFC 5280 §5.3.1 CRLReason codes that an ACME subscriber may reasonably choose.
REASONS: dict[str, int] = {"keyCompromise": 1, "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5}
KEY_COMPROMISE = "keyCompromise"
CEASED = "cessationOfOperation"

_REVOKED, _COMPROMISED, _DESTROYED = "revoked", "key_compromised", "key_destroyed"


def parse_reason(text: str) -> str:
    """The canonical reason name for ``text`` (case-insensitive); UsageError otherwise."""
    for name in REASONS:
        if name.lower() == text.strip().lower():
            return name
    raise UsageError(f"unknown revocation reason {text!r}; expected one of {', '.join(REASONS)}")


@dataclass(frozen=True)
class Revocation:
    """That a version was revoked at the CA: why, when and by whom (as the meta recorded it;
    a hand-edited meta may lack any of them)."""

    reason: str | None
    code: int | None = None
    time: str | None = None
    initiator: str | None = None

    @classmethod
    def of(cls, reason: str, time: str | None, initiator: str) -> Revocation:
        return cls(reason, REASONS[reason], time, initiator)

    @classmethod
    def from_meta(cls, raw: Any) -> Revocation | None:
        if not raw:
            return None
        if not isinstance(raw, Mapping):  # a truthy mark without details still means revoked
            return cls(None)
        return cls(raw.get("reason"), raw.get("code"), raw.get("time"), raw.get("initiator"))

    def to_meta(self) -> dict[str, Any]:
        """The meta change that records this revocation."""
        return {_REVOKED: {"reason": self.reason, "code": self.code, "time": self.time, "initiator": self.initiator}}


@dataclass(frozen=True)
class VersionStatus:
    """Where one stored version is in its life, parsed from its meta."""

    revoked: Revocation | None = None
    key_compromised: bool = False
    key_destroyed: bool = False
    bad: str | None = None  # why a fleet release marked it bad (certd.core.release.BAD)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> VersionStatus:
        return cls(Revocation.from_meta(meta.get(_REVOKED)), bool(meta.get(_COMPROMISED)),
                   bool(meta.get(_DESTROYED)), bad_reason(meta))

    @property
    def held(self) -> str | None:
        """Why the scheduler must not renew this (current) version, or None: revoked for
        cessationOfOperation, the operator ended it."""
        rev = self.revoked
        if rev is not None and rev.reason == CEASED:
            return (f"revoked ({CEASED}) by {rev.initiator or '?'}: not renewing; "
                    f"renew --force to resume, or remove it from the configuration")
        return None

    @property
    def key_to_destroy(self) -> bool:
        """Its key is compromised and still kept somewhere."""
        return self.key_compromised and not self.key_destroyed

    def deploy_refusal(self, name: str, version: int) -> str | None:
        """Why this version must never be deployed again, or None: the one predicate
        "deployable" (S3) that a fleet node's apply, its switch back, a rollback and a release
        all ask (through :func:`certd.engine.releases.deploy_refusal`)."""
        if self.key_compromised:
            return f"{name} version {version} has a compromised key; it cannot be deployed again"
        if self.key_destroyed:
            return (f"{name} version {version}'s private key was destroyed (destroy_after); it cannot be deployed "
                    f"again: choose a newer version")
        if self.revoked is not None:
            return f"{name} version {version} was revoked ({self.revoked.reason}); it cannot be deployed again"
        if self.bad is not None:
            return f"{name} version {version} is marked bad ({self.bad}); it is never deployed again"
        return None


def compromised_meta() -> dict[str, Any]:
    """The meta change that marks a version's key compromised."""
    return {_COMPROMISED: True}


def is_held(meta: Mapping[str, Any]) -> str | None:
    """:attr:`VersionStatus.held` of a version's raw meta."""
    return VersionStatus.from_meta(meta).held
