"""The Issuer over an injected Transport: a whole order against a fake CA network (no HTTP),
including a CA that forgot the account."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
from acme import messages

from certd.acme.issuer import Issuer
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import FakeClock

CA = "https://ca.test"
FULLCHAIN = b"-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n"
DIRECTORY = {"newNonce": f"{CA}/nonce", "newAccount": f"{CA}/acct", "newOrder": f"{CA}/order",
             "revokeCert": f"{CA}/revoke"}


class FakeCA:
    """The CA's side of every network the transport hands out: one order, validated at once."""

    def __init__(self, forget_account_once: bool = False) -> None:
        self.forget_account_once = forget_account_once
        self.accounts = 0
        self.posted: list[str] = []

    def answer(self, url: str, obj: Any, account: Any) -> tuple[int, dict[str, str], Any]:
        self.posted.append(url)
        if url == DIRECTORY["newAccount"]:
            self.accounts += 1
            return 201, {"Location": f"{CA}/acct/{self.accounts}"}, {"status": "valid"}
        if url == DIRECTORY["newOrder"] and self.forget_account_once:
            self.forget_account_once = False
            raise messages.Error(typ="urn:ietf:params:acme:error:accountDoesNotExist", detail="who?")
        if url == DIRECTORY["newOrder"]:
            return 201, {"Location": f"{CA}/order/1"}, self.order("pending")
        if url == f"{CA}/authz/1":
            return 200, {}, {"status": "pending", "identifier": {"type": "dns", "value": "www.example.test"},
                             "challenges": [{"type": "http-01", "url": f"{CA}/chall/1", "status": "pending",
                                             "token": "tok_" + "A" * 40}]}
        if url == f"{CA}/chall/1":
            return 200, {}, {"type": "http-01", "url": f"{CA}/chall/1", "status": "processing", "token": "t"}
        if url == f"{CA}/order/1":
            return 200, {}, self.order("ready")
        if url == f"{CA}/finalize/1":
            return 200, {}, self.order("valid", certificate=f"{CA}/cert/1")
        if url == f"{CA}/cert/1":
            return 200, {}, FULLCHAIN
        raise AssertionError(f"unexpected POST {url}")

    @staticmethod
    def order(status: str, **extra: str) -> dict[str, Any]:
        return {"status": status, "identifiers": [{"type": "dns", "value": "www.example.test"}],
                "authorizations": [f"{CA}/authz/1"], "finalize": f"{CA}/finalize/1", **extra}


class FakeNetwork:
    """One thread's network: GETs the directory, POSTs to the FakeCA."""

    def __init__(self, ca: FakeCA) -> None:
        self.ca, self.key, self.alg, self.account, self.time_left = ca, None, None, None, None

    def get(self, url: str, **_: Any) -> requests.Response:
        assert url == f"{CA}/dir"
        return _response(200, {}, DIRECTORY)

    def post(self, url: str, obj: Any, **_: Any) -> requests.Response:
        assert self.key is not None, "unsigned POST"
        return _response(*self.ca.answer(url, obj, self.account))

    def close(self) -> None:
        pass


class FakeTransport:
    def __init__(self, ca: FakeCA) -> None:
        self.ca, self.networks = ca, 0

    def network(self) -> FakeNetwork:
        self.networks += 1
        return FakeNetwork(self.ca)

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        pass


class Accounts:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def load_account(self, directory_url: str) -> None:
        return None

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        self.saved.append(json.loads(registration_json)["uri"])


def _response(status: int, headers: dict[str, str], body: Any) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    response._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return response


def _issue(tmp_path: Path, ca: FakeCA) -> tuple[bytes, Accounts]:
    from certd.crypto.keys import generate_private_key
    accounts = Accounts()
    issuer = Issuer(AcmeConfig(directory=f"{CA}/dir", agree_tos=True), accounts, FakeClock(), FakeTransport(ca))
    cert = CertificateConfig(name="www", domains=("www.example.test",), http01_webroot=tmp_path)
    return issuer.issue(cert, generate_private_key("ecdsa-p256")), accounts


def test_an_order_runs_over_the_injected_transport(tmp_path: Path) -> None:
    """Account, order, challenge, poll, finalize and download all go through the transport's networks."""
    ca = FakeCA()
    fullchain, accounts = _issue(tmp_path, ca)
    assert fullchain == FULLCHAIN and accounts.saved == [f"{CA}/acct/1"]
    assert ca.posted == [DIRECTORY["newAccount"], DIRECTORY["newOrder"], f"{CA}/authz/1", f"{CA}/chall/1",
                         f"{CA}/order/1", f"{CA}/finalize/1", f"{CA}/cert/1"]
    assert not any((tmp_path / ".well-known" / "acme-challenge").iterdir())   # the webroot is tidied


def test_a_ca_that_forgot_the_account_gets_it_again_and_the_order_is_retried(tmp_path: Path) -> None:
    """accountDoesNotExist: the same key is registered again, saved, and the order placed once more."""
    ca = FakeCA(forget_account_once=True)
    fullchain, accounts = _issue(tmp_path, ca)
    assert fullchain == FULLCHAIN and accounts.saved == [f"{CA}/acct/1", f"{CA}/acct/2"]
    assert ca.posted[:4] == [DIRECTORY["newAccount"], DIRECTORY["newOrder"], DIRECTORY["newAccount"],
                             DIRECTORY["newOrder"]]
