"""A certificate's failed attempts as kept in its state: what kind of failure (see
:mod:`certd.core.retry`), how many of that kind in a row, the CA's problem, and the earliest next
try — persisted so a restart keeps a hold — plus the certificates issued per rolling week
(the CA's duplicate-certificate limit). :class:`CertState` and pure functions over it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from certd.core import retry
from certd.core.clock import isoformat


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
    kind_failures: int = 0                     # failures of that kind in a row (retry.count_after)
    early_retry: str | None = None             # ISO 8601: the last early retry granted (retry.early_allowed)
    problem: str | None = None                 # the CA's problem type (short form), if any
    retry_after: str | None = None             # ISO 8601: no attempt before (held, rate_limited)
    fix: str | None = None                     # what an operator does about a hold
    issued: list[dict[str, Any]] | None = None  # [{"at", "names"}] this rolling week (duplicate limit)
    forced_retry: str | None = None            # a forced renewal failed: the daemon retries it (backoff)
    # several CAs: {ca name: {"until", "kind", "problem", "count"}} while one is skipped (certd.core.failover)
    ca_waits: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> CertState:
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: Let's Encrypt's duplicate-certificate limit: 5 per exact set of names per rolling week.
DUPLICATE_LIMIT = 5
DUPLICATE_WINDOW = timedelta(days=7)


def classify(error: BaseException | None) -> retry.Rule:
    """The retry rule for ``error`` (an AcmeError carries problem_type and where)."""
    return retry.rule_for(getattr(error, "problem_type", None), getattr(error, "where", None))


def problem_detail(error: BaseException | None) -> dict[str, str]:
    """The CA's problem (short type) and where in the order it answered, for a ``renewal_failed``
    audit record: an auditor tells a failed validation (an order the CA invalidated) from a
    refusal of the order, or from a failure on our side (no problem)."""
    problem = retry.short(getattr(error, "problem_type", None))
    if problem is None:
        return {}
    where = getattr(error, "where", None)
    return {"problem": problem, **({"where": where} if where else {})}


def note_failure(state: CertState, error: BaseException | None, now: datetime, backoff: timedelta) -> retry.Rule:
    """Record the kind of a failure in ``state`` (the caller counts ``state.failures``) and
    when the next try may come; returns the rule that applied."""
    rule = classify(error)
    early = retry.early_allowed(_parse_or_none(state.early_retry), now)
    state.kind_failures = retry.count_after(rule, state.failure_kind, state.kind_failures, early=early)
    if rule.kind == retry.HELD and state.kind_failures == 0:  # granted: none again for an hour
        state.early_retry = isoformat(now)
    state.failure_kind = rule.kind
    state.problem = retry.short(getattr(error, "problem_type", None))
    ra_seconds = getattr(error, "retry_after", None)
    ca_retry_after = now + timedelta(seconds=ra_seconds) if isinstance(ra_seconds, (int, float)) else None
    at = retry.next_allowed(rule.kind, state.kind_failures, now, backoff, ca_retry_after)
    # stored to the second: rounded up, so never a moment before what the CA asked
    state.retry_after = isoformat(at + timedelta(microseconds=999_999) if at.microsecond else at)
    state.fix = rule.fix or None
    return rule


def clear(state: CertState) -> None:
    """A success: no failure kind, no hold (the last early retry stays: the CA's limit counts
    failed validations per hour, successes in between or not)."""
    state.failure_kind, state.kind_failures, state.problem, state.retry_after, state.fix = None, 0, None, None, None
    state.forced_retry = None


def blocked_until(state: CertState, now: datetime) -> datetime | None:
    """The end of a hold or rate limit still running at ``now`` (None for a transient failure:
    the policy's backoff covers those)."""
    if state.failure_kind not in (retry.HELD, retry.RATE_LIMITED) or not state.retry_after:
        return None
    at = _parse(state.retry_after)
    return at if at > now else None


# -- what happens next, said truthfully by the process that says it ------------------------------

_NEXT = re.compile(r"(;\s*)?(will retry\b.*|not retrying\b.*)$")


def next_step(message: str, name: str, state: CertState, now: datetime, retries: bool) -> str:
    """``message`` (a failure) ending with what happens next: "will retry" only when this
    process does retry (``retries``: the daemon), and for a hold or rate limit when, and how to
    try now. Whatever next-step wording the error carried is replaced."""
    base = _NEXT.sub("", message).rstrip("; ")
    until = blocked_until(state, now)
    at = isoformat(until) if until else None
    if state.failure_kind == retry.HELD and at:
        tail = (f"held: next try at {at}; after fixing it, try now with: certd renew --force {name}" if retries else
                f"after fixing it, try again with: certd renew --force {name} (certd run would wait until {at})")
    elif state.failure_kind == retry.RATE_LIMITED and at:
        tail = (f"rate limited: will retry after {at}" if retries else
                f"rate limited by the CA until {at}; certd run retries then")
    else:
        tail = "will retry" if retries else f"run certd renew {name} again later (certd run retries by itself)"
    return f"{base}; {tail}"


# -- the duplicate-certificate limit -----------------------------------------------------------

def note_issued(state: CertState, domains: list[str] | tuple[str, ...], now: datetime) -> None:
    """Remember an issuance of ``domains`` (kept for :data:`DUPLICATE_WINDOW`)."""
    state.issued = [*_recent(state, now), {"at": isoformat(now), "names": sorted(set(domains))}]


def duplicate_refusal(state: CertState, domains: list[str] | tuple[str, ...], now: datetime) -> str | None:
    """One line saying why another certificate for exactly ``domains`` would exceed the limit
    and when it becomes possible; None if it would not."""
    names = sorted(set(domains))
    same = sorted(_parse(e["at"]) for e in _recent(state, now) if e.get("names") == names)
    if len(same) < DUPLICATE_LIMIT:
        return None
    possible = same[-DUPLICATE_LIMIT] + DUPLICATE_WINDOW
    return (f"{len(same)} certificates for exactly these names were issued in the last 7 days (the CA's "
            f"duplicate-certificate limit is {DUPLICATE_LIMIT}); another becomes possible at {isoformat(possible)}; "
            "use --ignore-duplicate-limit for a CA without that limit")


def _recent(state: CertState, now: datetime) -> list[dict[str, Any]]:
    out = []
    for e in state.issued or []:
        try:
            if isinstance(e, dict) and now - _parse(e["at"]) < DUPLICATE_WINDOW:
                out.append(e)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _parse_or_none(value: Any) -> datetime | None:
    """``value`` as a time; None when it is none, or not one (a hand-edited state)."""
    try:
        at = _parse(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return at if at is not None and at.tzinfo is not None else None
