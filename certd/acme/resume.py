"""Resuming an interrupted ACME order: the decision table, pure.

A renewal stores an order journal (order URL, the new key, the names, the CA directory) right
after newOrder and before finalize (:class:`certd.store.port.OrderJournal`). If the process dies
before the issued certificate is stored, the next attempt — this process, another one, in a
fleet another node — continues that order instead of placing a second one: the CA sees one
order, and a certificate it already issued is not issued twice.

Two questions, answered here without I/O:

- :func:`journal_mismatch`: may this journal be resumed at all by this renewal (same CA, same
  names)? Asked before talking to the CA.
- :func:`next_step`: given the order as the CA shows it now, what to do: download it
  (``valid``), wait for it (``processing``), finalize it (``ready``), prove control
  (``pending``), or discard it and order afresh (``invalid``, expired, unknown).

And one about failures, :func:`order_may_live`: after a failed attempt, may the journaled order
still complete (keep the journal), or is it over (discard it)?

A journal may also be an *intent*, written right before newOrder (no order URL yet): a process
killed between the CA's answer and journaling the URL left an order at the CA that only the
account's orders list can name (RFC 8555 §7.1.2.1). :func:`pick_order` chooses, among the
orders listed there, the one that intent placed, if any.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from certd.core.errors import AcmeError, ChallengeFailed, StoreError

#: keys of :attr:`OrderJournal.meta` written by the renewal (never key material)
META_DIRECTORY = "directory"
META_DOMAINS = "domains"
META_REPLACES = "replaces"
META_KEY_TYPE = "key_type"


class Step(str, enum.Enum):
    """What to do with a journaled order, by its status at the CA."""

    DOWNLOAD = "download"    # valid: the certificate is issued, fetch it
    WAIT = "wait"            # processing: finalized, the CA is issuing
    FINALIZE = "finalize"    # ready: every authorization is valid, send the CSR
    VALIDATE = "validate"    # pending: answer the authorizations' challenges, then finalize
    DISCARD = "discard"      # invalid, expired, or a status certd does not know: order afresh


#: problems answering the POST-as-GET of a journaled order that mean "no such order for you":
#: unknown to the CA (Pebble: 404 ``malformed``; RFC 7807 ``about:blank`` 404s), or placed by an
#: account the CA no longer knows. Any other problem (``serverInternal``, ``rateLimited``) says
#: nothing about the order: the attempt fails and the journal stays.
GONE_PROBLEMS = frozenset({"malformed", "unauthorized", "accountDoesNotExist", "about:blank"})
#: the same for an answer without a problem document (Pebble 2.10: a bare 404 for an unknown order)
GONE_STATUSES = frozenset({404, 410})

_BY_STATUS = {"valid": Step.DOWNLOAD, "processing": Step.WAIT, "ready": Step.FINALIZE, "pending": Step.VALIDATE}


def journal_meta(directory: str, domains: Collection[str], replaces: str | None,
                 key_type: str | None = None) -> dict[str, Any]:
    """The ``meta`` a renewal stores with its order journal (what :func:`journal_mismatch` reads)."""
    return {META_DIRECTORY: directory, META_DOMAINS: sorted(domains), META_REPLACES: replaces,
            META_KEY_TYPE: key_type}


def journal_mismatch(meta: Mapping[str, Any], directory: str, domains: Collection[str],
                     key_type: str | None = None) -> str | None:
    """Why a journal with ``meta`` cannot be resumed by a renewal for ``domains`` at the CA
    ``directory`` with keys of ``key_type`` (None: it can). An order belongs to one CA and one
    set of identifiers: resuming it after the configuration changed would issue what is no
    longer asked for (a journal without a key type is judged on CA and names alone)."""
    was = meta.get(META_DIRECTORY)
    if was != directory:
        return f"the order was placed with another CA ({was or 'unknown'})"
    names = meta.get(META_DOMAINS)
    if not isinstance(names, list) or sorted(str(n) for n in names) != sorted(domains):
        return f"the order is for other names ({', '.join(map(str, names or [])) or 'unknown'})"
    journaled_type = meta.get(META_KEY_TYPE)
    if key_type is not None and journaled_type is not None and journaled_type != key_type:
        return f"its key is {journaled_type}, the certificate now wants {key_type}"
    return None


def next_step(status: str, expires: datetime | None, now: datetime) -> tuple[Step, str]:
    """What to do with an order the CA shows as ``status`` (expiring at ``expires``) at ``now``,
    and why, for the log. An order past its expiry cannot be finalized (RFC 8555 §7.1.3) unless
    it is already ``valid``: its certificate stays downloadable."""
    step = _BY_STATUS.get(status, Step.DISCARD)
    if step is Step.DISCARD:
        return step, f"the order is {status}"
    if step is not Step.DOWNLOAD and expires is not None and expires <= now:
        return Step.DISCARD, f"the order expired at {expires.isoformat()} ({status})"
    return step, f"the order is {status}"


def order_gone(problem: str | None, status: int | None) -> bool:
    """Whether the CA answering a journaled order's URL with ``problem`` (a problem document's
    type) or, without one, HTTP ``status`` means the order is gone."""
    return problem in GONE_PROBLEMS if problem is not None else status in GONE_STATUSES


def order_may_live(error: Exception) -> bool:
    """After an attempt failed with ``error``: may the journaled order still complete (keep the
    journal, resume it next time), or is it over (discard it)?

    It may live when the CA was not heard to end it: the CA was unreachable or slow (a
    transient :class:`AcmeError`), or the certificate could not be stored (:class:`StoreError`:
    a full disk; the CA has issued, resuming downloads it again). It is over when validation
    failed (the order is ``invalid``), the CA refused for good, or the certificate it sent
    failed certd's checks (resuming would fetch the same rejected certificate). A lost lease
    (a StoreError) keeps it too: the journal is the new holder's to judge.
    """
    if isinstance(error, ChallengeFailed):
        return False
    if isinstance(error, AcmeError):
        return error.transient
    return isinstance(error, StoreError)


@dataclass(frozen=True)
class Listed:
    """One order from the account's orders list, as the CA shows it now."""

    url: str
    status: str
    identifiers: frozenset[str]        # the identifiers' values (names, IP addresses)
    profile: str | None = None         # as the order says (None: it says none)
    expires: datetime | None = None
    #: a ``valid`` order only: its certificate is for the intent's key and newer than every
    #: version stored (None: not looked at)
    ours: bool | None = None


@dataclass(frozen=True)
class Twins:
    """What the other certificates for exactly the same identifiers hold or ask for: an order
    the intent would match may be theirs. ``orders``: the order URLs their journals hold (never
    the intent's); ``intent``: one of them has an order intent of its own (or a journal that
    cannot be read), so a pending order may be its; ``profiles``: the profiles they require or
    prefer that this certificate does not."""

    orders: frozenset[str] = frozenset()
    intent: bool = False
    profiles: frozenset[str] = frozenset()


NO_TWINS = Twins()   # a certificate alone with its identifiers


def intent_matches(order: Listed, identifiers: Collection[str], profile: str | None,
                   twins: Twins = NO_TWINS) -> bool:
    """Whether ``order`` is for exactly the intent's ``identifiers`` and its profile: the same
    one; or, when the order names none, any (a CA that does not echo it); or, when the intent
    names none, any but a profile a twin certificate asks for (an order naming that was the
    twin's). An intent naming none does take an order naming another: a CA names the default
    it chose (Pebble: ``default``), and ``preferred_profile`` is not journaled as required."""
    if order.identifiers != frozenset(identifiers):
        return False
    if order.profile == profile or order.profile is None:
        return True
    return profile is None and order.profile not in twins.profiles


def pick_order(listed: Iterable[Listed], identifiers: Collection[str], profile: str | None, now: datetime,
               twins: Twins = NO_TWINS) -> tuple[Listed | None, str]:
    """(the order an intent for ``identifiers`` (and ``profile``) placed, among ``listed``, or
    None; why, for the log). A ``valid`` one whose certificate is ours (issued already: only a
    download is left); else the one ``pending`` or ``ready`` order not expired, if exactly one
    fits. Orders ``twins`` hold are never the intent's; with a twin's intent outstanding, no
    pending order is surely the intent's either.

    When in doubt, none: ordering afresh costs one order, resuming someone else's order costs a
    wrong or duplicate certificate. So two pending orders that fit are none (which one the intent
    placed is unknowable: a pending order carries no key), and so is any other order — another
    key's, an older certificate's, invalid, processing, expired."""
    fits: list[Listed] = []
    for order in listed:
        if order.url in twins.orders or not intent_matches(order, identifiers, profile, twins):
            continue
        if order.status == "valid":
            if order.ours:
                return order, "issued already with the intent's key (valid)"
            continue
        if order.status in ("pending", "ready") and (order.expires is None or order.expires > now):
            fits.append(order)
    if not fits:
        return None, "no order for the intent's names, profile and key"
    if twins.intent:
        return None, (f"{len(fits)} pending order(s) fit, but another certificate for these names has an "
                      "order intent too: which one is whose is unknown")
    if len(fits) > 1:
        return None, f"{len(fits)} pending orders fit the intent: which one it placed is unknown"
    return fits[0], f"the only order that fits ({fits[0].status})"
