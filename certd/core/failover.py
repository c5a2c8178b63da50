"""Several CAs in order: after one CA failed an order, try it again, fall to the next CA, or
stop and wait. Pure: facts in, a :class:`Step` with its reason out; no I/O, no clock.

A certificate lists its CAs in order (``ca = ["primary", "backup"]``). Each renewal starts at
the first CA that is not waiting (see :func:`waiting`) and moves down the list only when
another CA can help where waiting would not:

- **unreachable** — connection refused, timeouts, 5xx, ``serverInternal``: the CA has an
  incident. It is asked again up to :data:`TRANSIENT_BUDGET` times within this attempt, then
  the next CA is tried. Nothing is remembered: the next renewal asks the first CA again.
- **refuses the order permanently** — the ``held`` kind of :mod:`certd.core.retry` (CAA,
  ``rejectedIdentifier``, ``invalidProfile`` ...): the next CA at once; this CA waits out its
  hold schedule (per CA, so its hold does not block the others).
- **rate-limits** — when its ``Retry-After`` lies beyond the certificate's emergency point
  (the last tenth of its lifetime; no certificate yet: now), the next CA; this CA waits until
  then. Within the emergency point certd waits for it, as with one CA: the first CA is the
  operator's preference, and a wait that ends in time costs nothing.
- anything else (a dns-01 hook, a challenge responder, the store) is not the CA's doing:
  another CA would fail the same way, so the attempt stops there (today's backoff).

Why a budget within the attempt rather than across attempts: a CA that is down now is the case
fallback exists for, and the certificate should not wait a backoff to learn that twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from certd.core import retry
from certd.core.errors import AcmeError, CANotReachable, ChallengeFailed

#: how often one CA is asked within one attempt while it is unreachable, before the next CA
TRANSIENT_BUDGET = 2
#: the pause between those tries (through the clock)
TRANSIENT_PAUSE = 1.0

RETRY, NEXT, STOP = "retry", "next", "stop"

# problem types that mean "the CA's own trouble", besides no answer at all
_CA_TROUBLE = {None, "serverInternal", "badNonce"}


@dataclass(frozen=True)
class Step:
    """What to do after a failed order at one CA: ``action`` is RETRY (this CA again), NEXT
    (the next CA) or STOP (no other CA would help: wait); ``wait_until`` is set when this CA is
    to be skipped until then (held or rate limited), ``kind`` is that wait's kind."""

    action: str
    reason: str
    wait_until: datetime | None = None
    kind: str | None = None


def is_ca_trouble(error: BaseException) -> bool:
    """Whether ``error`` says the CA itself is down or broken (not our side, not a refusal)."""
    if isinstance(error, CANotReachable):
        return True
    if not isinstance(error, AcmeError) or isinstance(error, ChallengeFailed) or not error.transient:
        return False
    return retry.short(error.problem_type) in _CA_TROUBLE


def after_failure(error: BaseException, tries: int, now: datetime, emergency: datetime | None,
                  held_failures: int = 1, budget: int = TRANSIENT_BUDGET) -> Step:
    """The step after ``error`` ended the ``tries``-th order at one CA in this attempt.

    ``emergency`` is the current certificate's emergency point (None: no certificate yet, so
    nothing is served and any wait is too long); ``held_failures`` counts this CA's refusals in
    a row as :func:`certd.core.retry.count_after` counts them (its hold schedule,
    :func:`certd.core.retry.hold_delay`)."""
    rule = retry.rule_for(getattr(error, "problem_type", None), getattr(error, "where", None))
    problem = retry.short(getattr(error, "problem_type", None))
    if rule.kind == retry.HELD:
        until = now + retry.hold_delay(held_failures)
        return Step(NEXT, f"refused the order ({problem}): {rule.fix}", until, retry.HELD)
    if rule.kind == retry.RATE_LIMITED:
        seconds = getattr(error, "retry_after", None)
        limit = emergency if emergency is not None else now
        if not isinstance(seconds, (int, float)):
            if now >= limit:
                return Step(NEXT, "rate limited without Retry-After, and the certificate is past its emergency point",
                            now + retry.HOLD_FIRST, retry.RATE_LIMITED)
            return Step(STOP, "rate limited without Retry-After: waiting (the emergency point is not reached)")
        until = now + timedelta(seconds=seconds)
        if until > limit:
            what = "its emergency point" if emergency is not None else "now (no certificate yet)"
            return Step(NEXT, f"rate limited until {_iso(until)}, beyond {what}", until, retry.RATE_LIMITED)
        # the wait is this CA's too: when an earlier CA was only down, it is asked again sooner
        return Step(STOP, f"rate limited until {_iso(until)}, before the emergency point: waiting for it", until,
                    retry.RATE_LIMITED)
    if is_ca_trouble(error):
        if tries < budget:
            return Step(RETRY, f"not answering (try {tries} of {budget})")
        return Step(NEXT, f"not answering after {tries} {'try' if tries == 1 else 'tries'}")
    return Step(STOP, "failed on our side (not the CA's doing): another CA would fail the same way")


def waiting(waits: Mapping[str, Any] | None, ca: str, now: datetime) -> str | None:
    """Why CA ``ca`` is skipped at ``now`` (a hold or rate limit from an earlier attempt that
    lasts), else None. ``waits`` is ``{ca: {"until": ISO 8601, "kind", "problem"}}``."""
    entry = (waits or {}).get(ca)
    if not isinstance(entry, dict) or not entry.get("until"):
        return None
    try:
        until = datetime.fromisoformat(str(entry["until"]).replace("Z", "+00:00"))
    except ValueError:
        return None
    if until <= now:
        return None
    kind = "held" if entry.get("kind") == retry.HELD else "rate limited"
    problem = f" ({entry['problem']})" if entry.get("problem") else ""
    return f"{kind}{problem} until {_iso(until)}"


def worth_probing(cas: Sequence[str], waits: Mapping[str, Any] | None, now: datetime) -> list[str]:
    """The CAs (names, in order) of a certificate waiting for an unreachable CA whose answering
    is worth retrying it at once: those the renewal would order from. A CA waiting out a hold or
    rate limit answers the probe too, but it is skipped: retrying would only ask the CA that is
    still down, at every probe, past the backoff. One CA alone: always (no per-CA waits)."""
    if len(cas) == 1:
        return list(cas)
    return [ca for ca in cas if waiting(waits, ca, now) is None]


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
