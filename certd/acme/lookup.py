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
"""

from __future__ import annotations

import logging
from collections.abc import Collection
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
from certd.acme.resume import Listed, intent_matches, pick_order
from certd.core.model import CertInfo

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format

MAX_PAGES = 20        # pages of the orders list read at most
MAX_ORDERS = 200      # orders shown at most (the last listed: Pebble lists the oldest first)
MAX_DOWNLOADS = 4     # certificates of valid orders for the intent's names fetched to compare keys

_REFUSED = (messages.Error, acme_errors.ClientError)   # the CA answered, with a problem or a bare 4xx


def find(client: acme_client.ClientV2, identifiers: Collection[str], profile: str | None, spki_sha256: str,
         stored: Collection[str], now: datetime) -> tuple[str | None, str]:
    """(the URL of the order an intent for ``identifiers``, ``profile`` and the key whose SPKI
    hash is ``spki_sha256`` placed, or None; why, for the log). ``stored``: fingerprints of the
    certificates stored as versions (a valid order whose certificate is one of them is done).
    The CA unreachable raises as any request does; a CA refusing to show the list finds nothing."""
    url = orders_url(client)
    if url is None:
        return None, "the CA lists no orders for the account (no orders URL)"
    try:
        urls = listed_urls(client, url)
    except _REFUSED as e:
        return None, f"the CA did not list the account's orders ({_refusal(e)})"
    urls = urls[-MAX_ORDERS:]
    listed: list[Listed] = []
    downloads = 0
    for order_url in reversed(urls):   # the newest first where the CA lists the oldest first
        try:
            order = messages.Order.from_json(post_as_get(client, order_url).json())
        except _REFUSED:
            continue   # gone meanwhile
        item = Listed(order_url, getattr(order.status, "name", ""),
                      frozenset(str(i.value) for i in order.identifiers or ()), order.profile, order.expires)
        if item.status == "valid" and order.certificate and downloads < MAX_DOWNLOADS \
                and intent_matches(item, identifiers, profile):
            downloads += 1
            item = replace(item, ours=_ours(client, order.certificate, spki_sha256, stored))
        listed.append(item)
    listed.reverse()
    picked = pick_order(listed, identifiers, profile, now)
    if picked is None:
        return None, f"no order found for the journaled intent among the {len(listed)} the CA lists"
    return picked.url, f"the account's orders list has it ({picked.status})"


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


def listed_urls(client: acme_client.ClientV2, url: str) -> list[str]:
    """Every order URL of the list at ``url``, following ``rel="next"`` for up to
    :data:`MAX_PAGES` pages (a CA looping its pages stops there too)."""
    urls: list[str] = []
    seen = {url}
    for _ in range(MAX_PAGES):
        response = post_as_get(client, url)
        body: Any = response.json()
        orders = body.get("orders") if isinstance(body, dict) else None
        urls += [u for u in orders or () if isinstance(u, str)]
        links = requests.utils.parse_header_links(response.headers.get("Link", ""))
        following = next((urljoin(url, link["url"]) for link in links if link.get("rel") == "next"), None)
        if following is None or following in seen:
            break
        seen.add(following)
        url = following
    return urls


def _ours(client: acme_client.ClientV2, cert_url: str, spki_sha256: str, stored: Collection[str]) -> bool:
    """Whether the certificate at ``cert_url`` is for the intent's key and not stored yet."""
    try:
        info = CertInfo.from_pem(post_as_get(client, cert_url).content)
    except _REFUSED:
        return False
    except (ValueError, IndexError):   # not a PEM certificate
        return False
    return info.spki_sha256 == spki_sha256 and info.fingerprint_sha256 not in stored


def _refusal(e: messages.Error | acme_errors.ClientError) -> str:
    if isinstance(e, messages.Error):
        return f"{problem_code(e)}: {one_line(e.detail or '')}"
    return f"HTTP {http_status(e)}"
