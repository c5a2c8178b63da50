"""Finding an order intent's order in the account's orders list (certd.acme.lookup) against a
fake CA network that serves what a CA may: garbage, slowness, several orders that fit, an
older certificate with the same (reused) key. When in doubt the lookup finds nothing: giving
the intent up costs one order, a wrong pick a wrong or duplicate certificate."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from certd.acme import lookup
from certd.acme.resume import Twins
from certd.core.model import spki_sha256
from certd.crypto import keys
from tests.support.certs import CA, make_ca, make_leaf

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
NAMES = ("www.example.test", "example.test")
ACCOUNT, LIST = "https://ca.test/acct/1", "https://ca.test/list/1"


class Answer:
    """A CA's answer: a JSON body (or raw text), its content bytes, a Link header."""

    def __init__(self, body: Any = None, content: bytes = b"", link: str = "") -> None:
        self.body, self.content, self.headers = body, content, {"Link": link}

    def json(self) -> Any:
        return json.loads(self.body) if isinstance(self.body, str) else self.body


class CANet:
    """``client.net``: POST-as-GET answered from ``pages`` (an exception is raised); every
    request advances ``seconds`` on the lookup's monotonic clock."""

    def __init__(self, pages: dict[str, Any], seconds: float = 0.01) -> None:
        self.pages, self.seconds, self.asked = pages, seconds, []
        self.account = type("Account", (), {"uri": ACCOUNT})()
        self.now = 0.0

    def post(self, url: str, obj: Any, new_nonce_url: str = "") -> Any:
        self.asked.append(url)
        self.now += self.seconds
        answer = self.pages[url]
        if isinstance(answer, Exception):
            raise answer
        return answer


def order(status: str = "pending", names: tuple[str, ...] = NAMES, *, expires: datetime = NOW + timedelta(days=7),
          profile: str | None = None, certificate: str | None = None) -> Answer:
    body: dict[str, Any] = {"status": status, "identifiers": [{"type": "dns", "value": n} for n in names],
                            "authorizations": [], "finalize": "https://ca.test/finalize/1",
                            "expires": expires.isoformat().replace("+00:00", "Z")}
    if profile:
        body["profile"] = profile
    if certificate:
        body["certificate"] = certificate
    return Answer(body)


def ca_with(orders: dict[str, Any], extra: dict[str, Any] | None = None, seconds: float = 0.01) -> Any:
    """A client whose account lists ``orders`` (in that order) on one page."""
    pages = {ACCOUNT: Answer({"orders": LIST}), LIST: Answer({"orders": list(orders)}), **orders, **(extra or {})}
    net = CANet(pages, seconds)
    return type("Client", (), {"net": net, "directory": {"newNonce": "https://ca.test/nonce"}})()


def find(client: Any, key_pem: bytes, *, newer_than: datetime | None = None, profile: str | None = None,
         **kw: Any) -> tuple[str | None, str]:
    spki = spki_sha256(keys.load_private_key(key_pem).public_key())
    return lookup.find(client, NAMES, profile, spki, newer_than, NOW, monotonic=lambda: client.net.now, **kw)


@pytest.fixture(scope="module")
def test_ca() -> CA:
    return make_ca(now=NOW)


KEY = keys.generate_private_key("ecdsa-p256")


def cert_for(test_ca: CA, not_before: datetime, key_pem: bytes = KEY) -> Answer:
    key = serialization.load_pem_private_key(key_pem, None)
    return Answer(content=make_leaf(test_ca, NAMES, key=key, not_before=not_before).fullchain_pem)  # type: ignore[arg-type]


@pytest.mark.parametrize("pages", [
    {LIST: Answer({"orders": "https://ca.test/order/1"})},                 # orders: a string, not a list
    {LIST: Answer("<html>503 Service Unavailable</html>")},               # not JSON
    {LIST: Answer(["https://ca.test/order/1"])},                           # not an object
    {"https://ca.test/order/1": Answer({"status": "pending", "identifiers": "zzz"})},  # an order acme rejects
    {"https://ca.test/order/1": requests.exceptions.MissingSchema("Invalid URL '1'")},  # an exception of requests
])
def test_an_answer_the_lookup_cannot_judge_finds_nothing_instead_of_failing(pages: dict[str, Any]) -> None:
    """Garbage from the CA (bad JSON, orders not a list, a bad order body, a library error): nothing found, never an error that keeps the intent."""
    client = ca_with({"https://ca.test/order/1": order()}, pages)
    url, why = find(client, KEY)
    assert url is None and "could not be read" in why, why


def test_only_the_ca_unreachable_fails_the_lookup() -> None:
    """A refused connection is the one failure that raises: the intent is kept for a later lookup."""
    client = ca_with({"https://ca.test/order/1": requests.exceptions.ConnectionError("Connection refused")})
    with pytest.raises(requests.exceptions.ConnectionError):
        find(client, KEY)


def test_a_lookup_past_its_budget_finds_nothing_and_stops_asking() -> None:
    """A CA taking 3 s an answer over 30 orders: the lookup stops at its 20 s budget and finds nothing."""
    client = ca_with({f"https://ca.test/order/{i}": order() for i in range(30)}, seconds=3.0)
    url, why = find(client, KEY)
    assert url is None and "over 20 s" in why, why
    assert len(client.net.asked) <= 8, client.net.asked


def test_two_pending_orders_that_fit_are_neither_taken() -> None:
    """Which of two pending orders for the names the intent placed is unknowable (no key yet): none is taken."""
    client = ca_with({"https://ca.test/order/1": order(), "https://ca.test/order/2": order("ready")})
    url, why = find(client, KEY)
    assert url is None and "2 pending orders" in why, why


def test_an_order_another_certificates_journal_holds_is_not_taken() -> None:
    """The ECDSA twin of an RSA certificate journaled order 1: the intent takes only order 2, and none while the twin has an intent of its own."""
    client = ca_with({"https://ca.test/order/1": order(), "https://ca.test/order/2": order()})
    held = frozenset({"https://ca.test/order/1"})
    assert find(client, KEY, twins=Twins(held))[0] == "https://ca.test/order/2"
    url, why = find(client, KEY, twins=Twins(held, intent=True))
    assert url is None and "order intent too" in why, why


def test_an_intent_without_a_profile_takes_no_order_naming_a_twins_profile() -> None:
    """A twin requires "shortlived": an order naming it is the twin's, not a no-profile intent's; the CA's own default (Pebble names it) still is."""
    client = ca_with({"https://ca.test/order/1": order(profile="shortlived")})
    assert find(client, KEY, twins=Twins(profiles=frozenset({"shortlived"})))[0] is None
    assert find(client, KEY, profile="shortlived")[0] == "https://ca.test/order/1"
    assert find(client, KEY)[0] == "https://ca.test/order/1", "the CA's default profile, named"


def test_a_valid_order_with_a_reused_key_is_ours_only_if_newer_than_every_stored_version(test_ca: CA) -> None:
    """reuse_key, versions pruned: an older still-valid order has the same key; it is taken only when its certificate is newer than the newest stored version."""
    stored_nb = NOW - timedelta(days=30, hours=1)   # the newest stored version, backdated an hour by its CA
    client = ca_with({"https://ca.test/order/1": order("valid", certificate="https://ca.test/cert/1")},
                     {"https://ca.test/cert/1": cert_for(test_ca, NOW - timedelta(days=60))})
    assert find(client, KEY, newer_than=stored_nb)[0] is None, "an older certificate came back as a renewal"
    assert find(client, KEY, newer_than=NOW - timedelta(days=61))[0] == "https://ca.test/order/1"


@pytest.mark.parametrize("newest_first", [False, True])
def test_the_newest_valid_order_of_the_intent_is_taken_at_the_first_match(test_ca: CA, newest_first: bool) -> None:
    """Whichever way the CA lists its orders, the newest is looked at first, and the first of the intent's valid orders ends the lookup."""
    orders = {"https://ca.test/order/old": order("valid", expires=NOW + timedelta(days=1), certificate="https://ca.test/cert/old"),
              "https://ca.test/order/mid": order("invalid", expires=NOW + timedelta(days=3)),
              "https://ca.test/order/new": order("valid", expires=NOW + timedelta(days=7), certificate="https://ca.test/cert/new")}
    if newest_first:
        orders = dict(reversed(orders.items()))
    client = ca_with(orders, {"https://ca.test/cert/old": cert_for(test_ca, NOW - timedelta(hours=3)),
                              "https://ca.test/cert/new": cert_for(test_ca, NOW - timedelta(hours=1))})
    assert find(client, KEY, newer_than=NOW - timedelta(days=30))[0] == "https://ca.test/order/new"
    assert "https://ca.test/cert/old" not in client.net.asked and "https://ca.test/order/mid" not in client.net.asked
