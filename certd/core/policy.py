"""When to renew, and how long to back off after a failure. Pure: facts + now -> decision.

The renewal time is layered, like certmagic's, and every decision carries its reason:

1. no certificate yet -> now;
2. an ARI window (RFC 9773 §4.2) that lies wholly in the past -> now (the CA asks for renewal,
   typically because the certificate was revoked);
3. a plausible ARI window -> a uniformly random instant inside it (§4.2 asks clients to spread
   load that way), drawn from the part of the window that ends before the safety point (a
   fifth of the lifetime left; a third for certificates shorter than 10 days): a CA may offer
   its whole lifetime as the window (Pebble 2.10 does for short certificates), and a draw
   in its last tenth would only meet the emergency
   point with no time left for the rotation itself. A window that does not fit inside the
   certificate's lifetime is not plausible (Pebble 2.6 serves a fixed ±24 h window even for
   2-minute certificates) and is ignored, with the reason logged;
4. else the configured ``renew_before`` (fraction of lifetime or duration), defaulting to a
   third of the lifetime remaining (half for certificates shorter than 10 days), minus a small
   jitter so a fleet does not renew in lock-step;
5. whatever was chosen, an emergency point (a tenth of the lifetime before expiry) wins if it
   comes earlier: an ARI window that is too late never lets a certificate expire;
6. a key with a ``max_key_age`` (key classes) is due for a new key when it reaches that age,
   if that comes earlier still: the certificate is renewed while valid, and that renewal makes
   a new key even with ``reuse_key`` (:func:`needs_new_key`).

A failed attempt is retried after an exponential backoff whose base and cap scale with the
certificate's lifetime and with the time left, so a 2-minute certificate retries within
seconds, a 90-day one within the hour, and a certificate never sits in backoff past expiry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction

from certd.core.clock import isoformat

SHORT_LIFETIME = timedelta(days=10)
EMERGENCY_FRACTION = Fraction(1, 10)
# The latest instant a draw in the CA's window may land on: twice the emergency margin, so a
# rotation started there (issue, deploy, reload, verify — seconds, or minutes under load) is
# done long before the emergency point. Let's Encrypt's windows end near a third left: untouched.
SAFETY_FRACTION = Fraction(1, 5)
# Short certificates (Let's Encrypt's 6-day ones, test CAs' minutes) keep a third: a restart or
# a renewal herd costs the same seconds whatever the lifetime (CI's soak, 3-minute certificates
# SIGKILLed mid-herd, missed 7 emergency points with a fifth).
SHORT_SAFETY_FRACTION = Fraction(1, 3)


@dataclass(frozen=True)
class RenewBefore:
    """Renew when this fraction of the lifetime, or this much time, remains."""

    fraction: Fraction | None = None
    duration: timedelta | None = None


@dataclass(frozen=True)
class AriWindow:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Facts:
    """What the policy needs to know about one certificate, gathered by the caller."""

    not_before: datetime | None = None      # None: no certificate yet
    not_after: datetime | None = None
    renew_before: RenewBefore | None = None
    ari: AriWindow | None = None
    failures: int = 0                        # consecutive failed attempts
    last_failure: datetime | None = None
    key_created: datetime | None = None      # when the certificate's key was generated
    max_key_age: timedelta | None = None
    key_rule: str = "certificate"            # which rule set max_key_age ("key_class NAME", ...)
    renew_before_rule: str | None = None     # named in the reason when a key class is involved


@dataclass(frozen=True)
class Decision:
    renew_at: datetime
    reason: str
    emergency: bool = False
    ca_requested: bool = False   # an ARI window wholly in the past: the CA asks for renewal now

    def is_due(self, now: datetime) -> bool:
        return self.renew_at <= now


def decide(facts: Facts, now: datetime, rng: random.Random | None = None) -> Decision:
    """When this certificate should next be renewed, and why (see the module essay)."""
    rng = rng or random.Random()
    if facts.not_before is None or facts.not_after is None:
        if facts.failures > 0 and facts.last_failure is not None:
            retry = facts.last_failure + first_issue_backoff(facts.failures, rng)
            if retry > now:
                return Decision(retry, f"no certificate yet; retry {facts.failures} after failure, "
                                       f"backoff until {isoformat(retry)}")
        return Decision(now, "no certificate yet")
    base = _key_age(facts, _scheduled(facts, now, rng))
    if facts.failures > 0 and facts.last_failure is not None:
        retry = facts.last_failure + backoff(facts.failures, facts.not_before, facts.not_after, facts.last_failure, rng)
        if retry > base.renew_at:
            return Decision(retry, f"retry {facts.failures} after failure, backoff until {isoformat(retry)}",
                            base.emergency)
    return base


def _scheduled(facts: Facts, now: datetime, rng: random.Random) -> Decision:
    assert facts.not_before is not None and facts.not_after is not None
    lifetime = facts.not_after - facts.not_before
    emergency_at = expiring_at(facts.not_before, facts.not_after)
    if facts.not_after <= now:
        return Decision(now, f"the certificate expired at {isoformat(facts.not_after)}", True)
    ari = facts.ari
    note = ""
    if ari is not None:
        if ari.end <= now:
            return Decision(now, f"ARI window ended {isoformat(ari.end)}: the CA asks for renewal now (revoked?)",
                            ca_requested=True)
        if ari.start >= facts.not_before and ari.end <= facts.not_after and ari.end > ari.start:
            window = f"ARI window {isoformat(ari.start)}..{isoformat(ari.end)}"
            if ari.start > emergency_at:
                return Decision(emergency_at, f"{window} is too late; emergency renewal at 1/10 of lifetime left", True)
            safety = SHORT_SAFETY_FRACTION if lifetime < SHORT_LIFETIME else SAFETY_FRACTION
            safety_at = facts.not_after - lifetime * safety.numerator / safety.denominator
            end = max(min(ari.end, safety_at), ari.start)
            at = ari.start + timedelta(seconds=rng.uniform(0, (end - ari.start).total_seconds()))
            if end < ari.end:
                return Decision(at, f"random point in {window}, drawn before {safety} of lifetime left")
            return Decision(at, f"random point in {window}")
        note = f" (ARI window {isoformat(ari.start)}..{isoformat(ari.end)} ignored: outside the certificate's lifetime)"
    at, why = _lifetime_point(facts, lifetime)
    if at > emergency_at:
        return Decision(emergency_at,
                        f"{why} is later than the emergency point; renewing at 1/10 of lifetime left{note}", True)
    jitter = timedelta(seconds=rng.uniform(0, min(lifetime.total_seconds() / 50, 3600)))
    return Decision(max(at - jitter, facts.not_before), f"{why}{note}")


def _key_age(facts: Facts, base: Decision) -> Decision:
    """``base``, unless the key reaches its max_key_age before it: then that point, and why."""
    due = key_due_at(facts.key_created, facts.max_key_age)
    if due is None or due >= base.renew_at or facts.max_key_age is None:
        return base
    return Decision(due, f"key older than max_key_age {_fmt(facts.max_key_age)} ({facts.key_rule})")


def key_due_at(key_created: datetime | None, max_key_age: timedelta | None) -> datetime | None:
    """When a key created at ``key_created`` reaches ``max_key_age`` (None: no limit or unknown)."""
    if key_created is None or max_key_age is None:
        return None
    return key_created + max_key_age


def needs_new_key(key_created: datetime | None, max_key_age: timedelta | None, now: datetime,
                  cycle: timedelta) -> str | None:
    """Why a renewal at ``now`` must make a new key although ``reuse_key`` is on, or None.

    The key is replaced once it is older than ``max_key_age``, and also when it would pass that
    age before the certificate issued now is renewed again, estimated as one more ``cycle`` like
    the current certificate's (now - its notBefore): reusing it then would only buy a second
    renewal soon after, for the key alone."""
    due = key_due_at(key_created, max_key_age)
    if due is None or max_key_age is None:
        return None
    if due <= now:
        return f"the key is older than max_key_age {_fmt(max_key_age)}"
    if due <= now + max(cycle, timedelta(0)):
        return f"the key would pass max_key_age {_fmt(max_key_age)} before the next renewal"
    return None


def _lifetime_point(facts: Facts, lifetime: timedelta) -> tuple[datetime, str]:
    at, why = _renew_before_point(facts, lifetime)
    return at, (f"{why} ({facts.renew_before_rule})" if facts.renew_before_rule else why)


def _renew_before_point(facts: Facts, lifetime: timedelta) -> tuple[datetime, str]:
    assert facts.not_after is not None
    rb = facts.renew_before
    if rb is not None and rb.duration is not None:
        if rb.duration < lifetime:
            return facts.not_after - rb.duration, f"renew_before {_fmt(rb.duration)} before expiry"
        fraction = Fraction(1, 3)
        why = f"renew_before {_fmt(rb.duration)} exceeds the {_fmt(lifetime)} lifetime; using 1/3 of lifetime left"
    elif rb is not None and rb.fraction is not None:
        fraction, why = rb.fraction, f"renew_before {rb.fraction} of lifetime left"
    elif lifetime < SHORT_LIFETIME:
        fraction, why = Fraction(1, 2), "1/2 of lifetime left (certificate shorter than 10 days)"
    else:
        fraction, why = Fraction(1, 3), "1/3 of lifetime left"
    return facts.not_after - lifetime * fraction.numerator / fraction.denominator, why


def backoff(failures: int, not_before: datetime, not_after: datetime, failed_at: datetime,
            rng: random.Random | None = None) -> timedelta:
    """Delay before retry number ``failures`` (1 = first retry).

    base = lifetime/1000 clamped to 1 s..60 s; doubling per failure; capped at an eighth of the
    time left (clamped to 5 s..1 h) so a certificate never backs off into expiry and a recovered
    CA is used within the hour. Up to 10 % jitter spreads a fleet's retries.

    For a 90-day certificate with 30 days left: 60 s, 2 min, 4 min, ... 1 h (reached after
    7 failures, about 2 h after the first). For a 2-minute certificate: 1 s, 2 s, 4 s, 5 s...
    """
    rng = rng or random.Random()
    lifetime = (not_after - not_before).total_seconds()
    base = min(max(lifetime / 1000, 1.0), 60.0)
    cap = min(max((not_after - failed_at).total_seconds() / 8, 5.0), 3600.0)
    delay = min(base * 2 ** max(failures - 1, 0), cap)
    return timedelta(seconds=delay * (1 + rng.uniform(0, 0.1)))


def first_issue_backoff(failures: int, rng: random.Random | None = None) -> timedelta:
    """Delay before retrying a first issuance: 2 s doubling to a 5-minute cap (plus up to 10 %).

    Nothing is served yet, so an operator is probably watching; still, a down CA is not hammered.
    """
    rng = rng or random.Random()
    delay = min(2.0 * 2 ** max(failures - 1, 0), 300.0)
    return timedelta(seconds=delay * (1 + rng.uniform(0, 0.1)))


def is_expiring_soon(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """Past the emergency point: alert-worthy unless a renewal succeeds very soon."""
    return now >= expiring_at(not_before, not_after)


def expiring_at(not_before: datetime, not_after: datetime) -> datetime:
    """The emergency point: the last :data:`EMERGENCY_FRACTION` of the lifetime."""
    lifetime = not_after - not_before
    return not_after - lifetime * EMERGENCY_FRACTION.numerator / EMERGENCY_FRACTION.denominator


def format_duration(d: timedelta) -> str:
    """``30d``, ``12h``, ``90m`` or ``45s``: a duration as the configuration writes it."""
    return _fmt(d)


def _fmt(d: timedelta) -> str:
    s = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0 and s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def ari_poll_interval(retry_after: datetime | None, now: datetime, lifetime: timedelta) -> timedelta:
    """How long until ARI is polled again for a certificate.

    RFC 9773 §4.3.2 lets clients clamp Retry-After to reasonable limits. certd clamps it to
    [min(1 min, lifetime/10), min(1 day, lifetime/10)]: a 90-day certificate honours a CA's
    6-hour Retry-After, while a 2-minute one looks every 12 s, so a revocation behind certd's
    back is noticed while the certificate still matters.
    """
    tenth = lifetime / 10
    floor, ceiling = min(timedelta(minutes=1), tenth), min(timedelta(days=1), tenth)
    wanted = (retry_after - now) if retry_after else timedelta(hours=6)
    return min(max(wanted, floor), ceiling)
