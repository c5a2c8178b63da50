"""A certificate's scheduling state as kept between runs (``state.json`` in the store): the
last attempt's result and error, the failure counters and holds (see :mod:`certd.engine.attempts`),
the cached ARI window. No key material. Pure data: imports nothing with I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CertState:
    """Per-certificate scheduling facts kept between runs (no key material)."""

    failures: int = 0
    last_failure: str | None = None
    last_error: str | None = None
    last_result: str | None = None
    last_attempt: str | None = None
    last_success: str | None = None
    ca_unreachable: bool = False               # the last failure was "CA not reachable"
    ari: dict[str, Any] | None = None          # {"serial", "start", "end", "retry_after"}
    # the last failure's kind (see certd.core.retry and certd.engine.attempts) and the earliest next try
    failure_kind: str | None = None
    kind_failures: int = 0                     # failures of that kind in a row
    problem: str | None = None                 # the CA's problem type (short form), if any
    retry_after: str | None = None             # ISO 8601: no attempt before (held, rate_limited)
    fix: str | None = None                     # what an operator does about a hold
    issued: list[dict[str, Any]] | None = None  # [{"at", "names"}] this rolling week (duplicate limit)
    forced_retry: str | None = None            # a forced renewal failed: the daemon retries it (backoff)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> CertState:
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)
