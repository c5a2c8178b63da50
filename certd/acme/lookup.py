"""Finding an order again at the CA from an order *intent* (journaled right before newOrder).

Why: a process killed after the CA accepted newOrder and before it journaled the order's URL
(SIGKILL, power, a fleet node lost) leaves an order nobody knows; the next attempt would order
again (the fleet soak counted 101 orders for 100 renewals). The intent holds what identifies
that order: its identifiers, CA, profile and the new key. RFC 8555 §7.1.2.1 gives every account
an ``orders`` URL listing its orders (POST-as-GET, paginated with ``Link: rel="next"``); Pebble
lists every order that is not invalid there. :func:`find` reads that list (bounded), shows each
order, and picks the intent's with :func:`certd.acme.resume.pick_order`; the caller resumes it
like any journaled order.

A CA without the list (Boulder, so Let's Encrypt: its account object has no ``orders``) gives
nothing to find: the caller orders afresh, which there costs no extra order either, since
Boulder answers a newOrder for the same names and account with the pending order it has.

A lookup never keeps an intent it cannot judge: anything but the CA being unreachable — an
answer certd cannot read (not JSON, ``orders`` not a list, an order body the ``acme`` library
rejects), a refusal, a lookup longer than :data:`BUDGET` — finds nothing, so the caller drops
the intent and orders afresh (at most one extra order). Only the CA unreachable raises (the
caller keeps the intent for a bounded number of tries). When in doubt it finds nothing too
(:func:`certd.acme.resume.pick_order`): two pending orders that fit, an order another
certificate's journal holds, a valid order whose certificate is not newer than every stored
version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import urljoin

import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages

from certd.acme.order import post_as_get
from certd.acme.problems import http_status, one_line, problem_code
from certd.acme.resume import NO_TWINS, Listed, Twins, intent_matches, pick_order
from certd.core.model import CertInfo

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format

MAX_PAGES = 20        # pages of the orders list read at most
MAX_ORDERS = 200      # orders shown at most (the newest: see _newest_first)
MAX_DOWNLOADS = 4     # certificates of valid orders for the intent's names fetched to compare keys
BUDGET = 20.0         # seconds a lookup may take (past it: nothing found, the intent is dropped)

_REFUSED = (messages.Error, acme_errors.ClientError)   # the CA answered, with a problem or a bare 4xx
#: the CA not answering at all: the only failure that keeps the intent (the lookup is asked again)
UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


class _OverBudget(Exception):
    """The lookup ran out of :data:`BUDGET`."""


def find(client: acme_client.ClientV2, identifiers: Collection[str], profile: str | None, spki_sha256: str,
         newer_than: datetime | None, now: datetime, *, twins: Twins = NO_TWINS,
         monotonic: Callable[[], float], budget: float = BUDGET) -> tuple[str | None, str]:
    """(the URL of the order an intent for ``identifiers``, ``profile`` and the key whose SPKI
    hash is ``spki_sha256`` placed, or None; why, for the log). ``newer_than``: the newest
    stored version's notBefore (a valid order is the intent's only if its certificate is newer:
    with a reused key, older orders have that key too). ``twins``: what other certificates for
    these identifiers hold (:class:`certd.acme.resume.Twins`). The CA unreachable raises (a requests
    ConnectionError or Timeout); every other failure, and a lookup past ``budget`` seconds (on
    ``monotonic``), finds nothing."""
    deadline = monotonic() + budget
    net: Any = client.net   # certd's Network (time_left), or a test's
    outer: Callable[[], float] | None = getattr(net, "time_left", None)
    # every request ends by the lookup's budget (and the order's deadline, when sooner)
    net.time_left = lambda: min(deadline - monotonic(), outer() if outer is not None else math.inf)
    try:
        return _find(client, identifiers, profile, spki_sha256, newer_than, now, twins,
                     lambda: deadline - monotonic())
    except UNREACHABLE:
        if deadline - monotonic() > 0:
            raise
        return None, f"the lookup took over {budget:g} s (the CA answers too slowly)"
    except _OverBudget:
        return None, f"the lookup took over {budget:g} s (the CA answers too slowly)"
    except Exception as e:  # noqa: BLE001 - an answer certd cannot judge: nothing found, never stuck
        return None, f"the CA's orders could not be read ({type(e).__name__}: {one_line(str(e))[:120]})"
    finally:
        net.time_left = outer


def _find(client: acme_client.ClientV2, identifiers: Collection[str], profile: str | None, spki_sha256: str,
          newer_than: datetime | None, now: datetime, twins: Twins,
          left: Callable[[], float]) -> tuple[str | None, str]:
    """:func:`find` without its budget and failure mapping: the orders newest first, stopping
    at the first valid order that is the intent's."""
    url = orders_url(client)
    if url is None:
        return None, "the CA lists no orders for the account (no orders URL)"
    try:
        urls = listed_urls(client, url, left)
    except _REFUSED as e:
        return None, f"the CA did not list the account's orders ({_refusal(e)})"
    shown: dict[str, messages.Order | None] = {}

    def show(order_url: str) -> messages.Order | None:
        if order_url not in shown:
            if left() <= 0:
                raise _OverBudget
            try:
                shown[order_url] = messages.Order.from_json(post_as_get(client, order_url).json())
            except _REFUSED:
                shown[order_url] = None   # gone meanwhile
        return shown[order_url]

    listed: list[Listed] = []
    downloads = 0
    for order_url in _newest_first(urls, show)[:MAX_ORDERS]:
        order = show(order_url)
        if order is None:
            continue
        item = Listed(order_url, getattr(order.status, "name", ""),
                      frozenset(str(i.value) for i in order.identifiers or ()), order.profile, order.expires)
        if item.status == "valid" and order.certificate and downloads < MAX_DOWNLOADS \
                and order_url not in twins.orders and intent_matches(item, identifiers, profile, twins):
            downloads += 1
            item = replace(item, ours=_ours(client, order.certificate, spki_sha256, newer_than))
            if item.ours:   # the newest first: the first that is the intent's is the one
                return order_url, "the account's orders list has it, issued already with the intent's key (valid)"
        listed.append(item)
    picked, why = pick_order(listed, identifiers, profile, now, twins)
    if picked is None:
        return None, f"{why}, among the {len(listed)} orders the CA lists"
    return picked.url, f"the account's orders list has it: {why}"


def _newest_first(urls: Sequence[str], show: Callable[[str], messages.Order | None]) -> list[str]:
    """``urls`` newest first. RFC 8555 does not say in which order a CA lists them (Pebble: the
    oldest first): the first and last listed orders' expiries tell (a later order expires
    later); when they cannot (unshown, no expiry, equal), the oldest first is assumed."""
    if len(urls) < 2:
        return list(urls)
    first, last = show(urls[0]), show(urls[-1])
    if first is not None and last is not None and first.expires is not None and last.expires is not None \
            and first.expires > last.expires:
        return list(urls)
    return list(reversed(urls))


def orders_url(client: acme_client.ClientV2) -> str | None:
    """The account's ``orders`` URL, from the account object (POST-as-GET to the account's URL:
    the ``acme`` library's Registration drops the field, so the stored registration lacks it)."""
    account = client.net.account
    if account is None:
        return None
    try:
        body: Any = post_as_get(client, account.uri).json()
    except _REFUSED as e:
        log.info("account_not_shown account=%s: %s", account.uri, _refusal(e))
        return None
    except ValueError:   # not JSON
        return None
    url = body.get("orders") if isinstance(body, dict) else None
    return url if isinstance(url, str) and url else None


def listed_urls(client: acme_client.ClientV2, url: str, left: Callable[[], float] | None = None) -> list[str]:
    """Every order URL of the list at ``url``, following ``rel="next"`` for up to
    :data:`MAX_PAGES` pages (a CA looping its pages stops there too). A page that is not an
    object with a list of ``orders`` raises ValueError (what else it holds is unknown); past
    ``left()`` (seconds) it stops with :class:`_OverBudget`."""
    urls: list[str] = []
    seen = {url}
    for _ in range(MAX_PAGES):
        if left is not None and left() <= 0:
            raise _OverBudget
        response = post_as_get(client, url)
        body: Any = response.json()
        orders = body.get("orders") if isinstance(body, dict) else None
        if not isinstance(orders, list):
            raise ValueError(f"a page of the orders list has no list of orders ({type(orders).__name__})")
        urls += [u for u in orders if isinstance(u, str)]
        links = requests.utils.parse_header_links(response.headers.get("Link", ""))
        following = next((urljoin(url, link["url"]) for link in links if link.get("rel") == "next"), None)
        if following is None or following in seen:
            break
        seen.add(following)
        url = following
    return urls


def _ours(client: acme_client.ClientV2, cert_url: str, spki_sha256: str, newer_than: datetime | None) -> bool:
    """Whether the certificate at ``cert_url`` is for the intent's key and newer than every
    stored version (its notBefore after ``newer_than``, the newest stored one's: with a reused
    key, an older order's certificate has the intent's key too, and rolling it out would move
    the expiry backwards). Never compared with the intent's time: CAs backdate notBefore."""
    try:
        info = CertInfo.from_pem(post_as_get(client, cert_url).content)
    except _REFUSED:
        return False
    except (ValueError, IndexError):   # not a PEM certificate
        return False
    return info.spki_sha256 == spki_sha256 and (newer_than is None or info.not_before > newer_than)


def _refusal(e: messages.Error | acme_errors.ClientError) -> str:
    if isinstance(e, messages.Error):
        return f"{problem_code(e)}: {one_line(e.detail or '')}"
    return f"HTTP {http_status(e)}"
