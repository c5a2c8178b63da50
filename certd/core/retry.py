"""When to try again after a failed renewal, by what the CA said. Pure: no I/O, no clock.

A CA's answer says what kind of failure it was, and each kind waits differently:

- ``transient`` — the CA or the network hiccuped (connection refused, 5xx, ``serverInternal``,
  ``badNonce`` storms, timeouts), or something on our side failed (a hook, a verification):
  the short exponential backoff of :func:`certd.core.policy.backoff`, bounded by the time left;
- ``rate_limited`` — the CA said "later" (``rateLimited``, RFC 8555 §6.6): never before its
  ``Retry-After``, nor before the backoff;
- ``held`` — the CA refused for a reason that does not go away by asking again (a CAA record,
  a name it will not issue for, a failed validation): every retry counts against the CA's
  failed-validation limit (Let's Encrypt: 5 per name per account per hour), so the next try
  waits 20 min, then 1 h, 2 h, 4 h ... capped at 24 h, whatever the certificate's time left.
  ``certd renew --force NAME`` is how an operator says "fixed, try now".
  One held failure is retried once early: ``connection`` at the challenge (the CA could not
  connect, or read EOF) is the one failed validation that a restart, a deploy or a node dying
  while the CA's request was on it produces by itself — in a fleet another node would have
  answered. Its rule says ``retry_first``: a refusal that starts a row waits
  :data:`FIRST_RETRY` (30 s, as certmagic retries within a minute; one more failed validation
  is well inside the CA's limit) and counts 0 on the schedule, so a second refusal in a row, of
  any held kind, holds 20 min and the schedule goes on from there. The early retry is granted
  at most once per :data:`EARLY_RETRY_EVERY` (an hour) per certificate (:func:`early_allowed`,
  the certificate's state keeps when): a row is ended by any other kind of failure in between
  (a transient one), and granting 30 s to every row would let connection failures
  interleaved with others spend the CA's failed-validation limit (Let's Encrypt: 5 per name per
  account per hour; two certificates sharing a name spend it twice as fast).

The table :data:`RULES` maps (problem type, where it happened) to a kind, each row citing the
RFC section that defines the problem. A problem not in the table keeps today's backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

TRANSIENT, RATE_LIMITED, HELD = "transient", "rate_limited", "held"
KINDS = (TRANSIENT, RATE_LIMITED, HELD)

# Where in an order the CA answered (set on the error by the issuer).
NEW_ORDER, CHALLENGE, FINALIZE, REPLACES = "newOrder", "challenge", "finalize", "replaces"

PREFIX = "urn:ietf:params:acme:error:"

#: The held schedule: 20 min after the first refusal, then 1 h doubling to a 24 h cap.
HOLD_FIRST = timedelta(minutes=20)
HOLD_CAP = timedelta(hours=24)
#: The early retry of a row started by a rule with ``retry_first`` (count 0 on the schedule).
FIRST_RETRY = timedelta(seconds=30)
#: At most one early retry per certificate in this long (the CA counts failed validations per hour).
EARLY_RETRY_EVERY = timedelta(hours=1)


@dataclass(frozen=True)
class Rule:
    kind: str
    cite: str          # where the problem type is defined
    fix: str = ""      # what an operator does about it (held only)
    retry_first: bool = False  # held only: a row it starts is retried after FIRST_RETRY, then held


_VALIDATION_FIX = "fix what the CA could not validate (DNS records, firewall, challenge responder)"

#: (problem type without the URN prefix, where) -> rule; where None matches anywhere.
RULES: dict[tuple[str, str | None], Rule] = {
    # transient: ask again soon
    ("badNonce", None): Rule(TRANSIENT, "RFC 8555 §6.5, §6.7 badNonce"),
    ("serverInternal", None): Rule(TRANSIENT, "RFC 8555 §6.7 serverInternal"),
    ("orderNotReady", None): Rule(TRANSIENT, "RFC 8555 §6.7 orderNotReady"),
    ("accountDoesNotExist", None): Rule(TRANSIENT, "RFC 8555 §6.7 accountDoesNotExist (re-registered)"),
    # replaces is advisory: the order is placed again without it, never held
    ("alreadyReplaced", REPLACES): Rule(TRANSIENT, "RFC 9773 §5, §7.4 alreadyReplaced"),
    ("unauthorized", REPLACES): Rule(TRANSIENT, "RFC 9773 §5 (replaces from another account)"),
    ("malformed", REPLACES): Rule(TRANSIENT, "RFC 9773 §5 (a CA that cannot use replaces)"),
    # rate_limited: never before Retry-After
    ("rateLimited", None): Rule(RATE_LIMITED, "RFC 8555 §6.6, §6.7 rateLimited"),
    # held: permanent refusals of the order
    ("caa", None): Rule(HELD, "RFC 8555 §6.7 caa, RFC 8659",
                        "fix the CAA records of the names so they allow this CA"),
    ("rejectedIdentifier", None): Rule(HELD, "RFC 8555 §6.7 rejectedIdentifier",
                                       "remove the name the CA will not issue for from domains"),
    ("unsupportedIdentifier", None): Rule(HELD, "RFC 8555 §6.7 unsupportedIdentifier",
                                          "use only identifier types the CA supports"),
    ("unauthorized", NEW_ORDER): Rule(HELD, "RFC 8555 §6.7 unauthorized",
                                      "check the account is allowed to order these names"),
    ("unauthorized", FINALIZE): Rule(HELD, "RFC 8555 §6.7 unauthorized",
                                     "check the account is allowed to order these names"),
    ("badCSR", None): Rule(HELD, "RFC 8555 §6.7 badCSR", "check key_type and the names"),
    ("badPublicKey", None): Rule(HELD, "RFC 8555 §6.7 badPublicKey", "use a key_type the CA accepts"),
    ("badSignatureAlgorithm", None): Rule(HELD, "RFC 8555 §6.7 badSignatureAlgorithm",
                                          "use a key_type the CA accepts"),
    ("userActionRequired", None): Rule(HELD, "RFC 8555 §6.7 userActionRequired",
                                       "visit the CA's instructions URL (terms of service?)"),
    ("externalAccountRequired", None): Rule(HELD, "RFC 8555 §6.7 externalAccountRequired",
                                            "set eab_kid and eab_hmac_key_file in the CA's [acme] or [[ca]] table"),
    ("invalidProfile", None): Rule(HELD, "draft-ietf-acme-profiles §4 invalidProfile",
                                   "set profile to one the CA offers, or use preferred_profile"),
    # held: failed validations (each counts against the CA's failed-validation limit)
    ("dns", CHALLENGE): Rule(HELD, "RFC 8555 §6.7 dns", _VALIDATION_FIX),
    # a restart, a deploy or a dying node (another would have answered) produces this by itself
    ("connection", CHALLENGE): Rule(HELD, "RFC 8555 §6.7 connection", _VALIDATION_FIX, retry_first=True),
    ("incorrectResponse", CHALLENGE): Rule(HELD, "RFC 8555 §6.7 incorrectResponse", _VALIDATION_FIX),
    ("tls", CHALLENGE): Rule(HELD, "RFC 8555 §6.7 tls", _VALIDATION_FIX),
    ("unauthorized", CHALLENGE): Rule(HELD, "RFC 8555 §6.7 unauthorized", _VALIDATION_FIX),
}

_DEFAULT = Rule(TRANSIENT, "not a CA refusal, or a problem type without a rule: today's backoff")


def short(problem_type: str | None) -> str | None:
    """``urn:ietf:params:acme:error:caa`` -> ``caa``."""
    if problem_type is None:
        return None
    return problem_type[len(PREFIX):] if problem_type.startswith(PREFIX) else problem_type


def rule_for(problem_type: str | None, where: str | None) -> Rule:
    """The rule for a CA's problem ``problem_type`` (full URN or short) answered at ``where``."""
    code = short(problem_type)
    if code is None:
        return _DEFAULT
    return RULES.get((code, where)) or RULES.get((code, None)) or _DEFAULT


def count_after(rule: Rule, previous_kind: str | None, previous_count: int, *, early: bool = True) -> int:
    """The failures of ``rule.kind`` in a row once a failure under ``rule`` is counted, the one
    before being of ``previous_kind`` (None: none since the last success), ``previous_count`` of
    them in a row. A held row started by a rule with ``retry_first`` counts 0 (its wait is
    :data:`FIRST_RETRY`) when ``early`` (no early retry for the certificate within the last
    hour: :func:`early_allowed`), else 1; the next held refusal in a row counts 1 more (20 min,
    1 h ...). A CA's own row in a failover (``ca_waits``) ends only when that CA issues, so it
    keeps the default."""
    if previous_kind == rule.kind:
        return previous_count + 1
    return 0 if rule.retry_first and early else 1


def early_allowed(last_early: datetime | None, now: datetime) -> bool:
    """Whether a row started at ``now`` may have the early retry, the last one granted to the
    certificate at ``last_early`` (None: never): once per :data:`EARLY_RETRY_EVERY`."""
    return last_early is None or now - last_early >= EARLY_RETRY_EVERY


def hold_delay(held_failures: int) -> timedelta:
    """How long the ``held_failures``-th refusal in a row holds: 20 min, 1 h, 2 h, 4 h ... 24 h;
    0 (a row started by a ``retry_first`` rule, see :func:`count_after`): :data:`FIRST_RETRY`."""
    if held_failures <= 0:
        return FIRST_RETRY
    if held_failures == 1:
        return HOLD_FIRST
    return min(timedelta(hours=2 ** (held_failures - 2)), HOLD_CAP)


def next_allowed(kind: str, kind_failures: int, failed_at: datetime, backoff: timedelta,
                 retry_after: datetime | None = None) -> datetime:
    """The earliest next attempt after a failure of ``kind`` (the ``kind_failures``-th of that
    kind in a row) at ``failed_at``; ``backoff`` is the transient backoff for this failure,
    ``retry_after`` the CA's Retry-After (rate_limited)."""
    at = failed_at + backoff
    if kind == RATE_LIMITED and retry_after is not None:
        at = max(at, retry_after)
    elif kind == HELD:
        at = max(at, failed_at + hold_delay(kind_failures))
    return at
