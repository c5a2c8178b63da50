"""How old a stored version's key is, and which rule set a certificate's key policy: what the
planner, the renewal and ``status`` read off a version's meta for key classes.

A version's meta records ``key_created`` (ISO 8601 UTC) when certd generated its key, and the
same time again in every later version that reuses that key (``reuse_key``), so the age is the
key's, not the certificate's. Versions stored before this existed have no ``key_created``: their
``created`` (when the version was stored) stands in, else the certificate's notBefore. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from certd.config import CertificateConfig
from certd.core.model import CertInfo

KEY_CREATED = "key_created"


def key_created(meta: Mapping[str, Any], info: CertInfo) -> datetime:
    """When the key of the version with ``meta`` and ``info`` was generated (see the module)."""
    for field in (KEY_CREATED, "created"):
        raw = meta.get(field)
        if isinstance(raw, str) and raw:
            try:
                return datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                continue  # a hand-edited meta: the next best guess
    return info.not_before


def key_age_days(created: datetime | None, now: datetime) -> float | None:
    """The key's age in days, one decimal (``status --json``'s ``key_age_days``)."""
    if created is None:
        return None
    return round(max((now - created).total_seconds(), 0.0) / 86400, 1)


def rule(cert: CertificateConfig, setting: str) -> str:
    """Which rule set ``setting`` for ``cert``: "key_class NAME", "certificate" or "default"
    (without a key class, a setting that matters was written on the certificate)."""
    return cert.origin(setting) if cert.key_class is not None else "certificate"


def class_rule(cert: CertificateConfig, setting: str) -> str | None:
    """The rule a reason names for ``setting`` ("key_class NAME" or "certificate") when a key
    class is involved and the setting is not simply the default; else None (reasons for
    certificates without a class stay as they were)."""
    if cert.key_class is None or cert.origin(setting) == "default":
        return None
    return cert.origin(setting)


def class_note(cert: CertificateConfig, setting: str) -> str:
    """:func:`class_rule` as a parenthesised suffix for a reason, or nothing."""
    why = class_rule(cert, setting)
    return f" ({why})" if why else ""
