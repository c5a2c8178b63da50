"""Golden test: certd's hand-built JWS (AcmeNetwork._wrap_in_jws) against the pinned ``acme``
library's own ClientNetwork, for the same requests, through a fake HTTP layer (no network)."""

from __future__ import annotations

import functools
import json
from typing import Any

import josepy as jose
import pytest
import requests
from acme import client as acme_client
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certd.acme.transport import AcmeNetwork
from certd.core.clock import FakeClock

NONCE = jose.b64encode(b"certd-golden-nonce-0001").decode()
NONCE_URL = "https://ca.test/nonce"
ACCOUNT = messages.RegistrationResource(uri="https://ca.test/acct/7", body=messages.Registration())
KEYS = {
    "ES256": (lambda: jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1())), jose.ES256),
    "ES384": (lambda: jose.JWKEC(key=ec.generate_private_key(ec.SECP384R1())), jose.ES384),
    "RS256": (lambda: jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), jose.RS256),
}
REQUESTS = {
    # newAccount: no account yet, so the public key (jwk) is in the header
    "newAccount": (None, "https://ca.test/new-acct",
                   messages.NewRegistration.from_data(email="ops@example.test", terms_of_service_agreed=True)),
    # newOrder: signed with the account URL (kid)
    "newOrder": (ACCOUNT, "https://ca.test/new-order",
                 messages.NewOrder(identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN,
                                                                    value="www.example.test")])),
    # POST-as-GET (RFC 8555 §6.3): an empty payload
    "postAsGet": (ACCOUNT, "https://ca.test/order/1", None),
}


class FakeHTTP:
    """The session both networks talk through: hands out NONCE and records every POST body."""

    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def request(self, method: str, url: str, *args: Any, data: Any = None, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = 200
        response.url = url
        response.headers["Replay-Nonce"] = NONCE
        if method == "POST":
            self.posted.append({"url": url, "body": json.loads(data)})
            response.headers["Content-Type"] = "application/json"
            response._content = b"{}"
        else:
            response._content = b""
        return response

    def mount(self, prefix: str, adapter: Any) -> None:
        pass

    def close(self) -> None:
        pass


@functools.cache
def _key(alg_name: str) -> jose.JWK:
    """One key per algorithm for the whole module (RSA keys take a while to make)."""
    return KEYS[alg_name][0]()


def _send(net: acme_client.ClientNetwork, url: str, obj: Any) -> dict[str, Any]:
    http = FakeHTTP()
    net.session = http  # type: ignore[assignment]
    net.post(url, obj, new_nonce_url=NONCE_URL)
    assert len(http.posted) == 1 and http.posted[0]["url"] == url
    return dict(http.posted[0]["body"])


def _decoded(jws: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(protected header, payload as JSON or b"" for POST-as-GET)."""
    protected = json.loads(jose.b64decode(jws["protected"]))
    payload = jose.b64decode(jws["payload"])
    return protected, (json.loads(payload) if payload else b"")


@pytest.mark.parametrize("alg_name", sorted(KEYS))
@pytest.mark.parametrize("request_name", sorted(REQUESTS))
def test_certd_signs_what_the_acme_library_signs(alg_name: str, request_name: str) -> None:
    """Same protected header (alg, nonce, url, kid or jwk) and payload as stock ClientNetwork; both verify."""
    alg, key = KEYS[alg_name][1], _key(alg_name)
    account, url, obj = REQUESTS[request_name]
    stock = acme_client.ClientNetwork(key, account=account, alg=alg, user_agent="golden")
    ours = AcmeNetwork(key, alg=alg, verify_ssl=True, user_agent="golden", timeout=5, clock=FakeClock(), lean=False)
    ours.account = account

    theirs_jws, ours_jws = _send(stock, url, obj), _send(ours, url, obj)

    assert set(ours_jws) == set(theirs_jws) == {"protected", "payload", "signature"}  # flattened JSON (RFC 7515 §7.2.2)
    ours_header, ours_payload = _decoded(ours_jws)
    theirs_header, theirs_payload = _decoded(theirs_jws)
    assert ours_header == theirs_header
    expected = {"alg": alg_name, "nonce": NONCE, "url": url}
    expected.update({"kid": ACCOUNT.uri} if account else {"jwk": key.public_key().to_partial_json()})
    assert ours_header == expected
    assert ours_payload == theirs_payload
    for jws in (ours_jws, theirs_jws):
        signed = f"{jws['protected']}.{jws['payload']}".encode()
        assert alg.verify(key.public_key().key, signed, jose.b64decode(jws["signature"]))
