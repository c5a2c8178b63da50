"""The order polling schedule and ARI, on a fake clock with canned CA answers (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from acme import messages

from certd.acme.issuer import Issuer
from certd.acme.order import FIRST_POLL, MAX_POLL, MAX_RETRY_AFTER, OrderFlow
from certd.acme.problems import Failure
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import FakeClock
from certd.core.errors import AcmeError
from certd.crypto import keys


class RecordingClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        super().sleep(seconds)


class CannedNet:
    """Answers every POST-as-GET of the order with the next canned (status, Retry-After)."""

    def __init__(self, answers: list[tuple[str, str | None]]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def post(self, url: str, obj: Any, **_: Any) -> requests.Response:
        self.calls += 1
        status, retry_after = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        response = requests.Response()
        response.status_code = 200
        body: dict[str, Any] = {"status": status, "identifiers": [], "authorizations": [],
                                "finalize": "https://ca.test/finalize"}
        if status == "valid":
            body["certificate"] = "https://ca.test/cert/1"
        response._content = json.dumps(body).encode()
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response


def _order(answers: list[tuple[str, str | None]], timeout: float = 90.0) -> tuple[OrderFlow, RecordingClock, CannedNet]:
    clock = RecordingClock()
    net = CannedNet(answers)
    client = SimpleNamespace(net=net, directory={"newNonce": "https://ca.test/nonce"})
    cert = CertificateConfig(name="www", domains=("www.example.test",), http01_webroot=Path("/tmp"))
    order = OrderFlow(client, cert, solver=None, say=lambda _m: None,  # type: ignore[arg-type]
                      deadline=clock.monotonic() + timeout, order_timeout=timeout, clock=clock,
                      fail=Failure("https://ca.test/dir", clock))
    return order, clock, net


def test_polls_at_once_then_backs_off_exponentially() -> None:
    """The first poll is immediate; waits then double from FIRST_POLL up to MAX_POLL."""
    order, clock, net = _order([("pending", None)] * 12 + [("ready", None)])
    assert order.poll("https://ca.test/order/1", "validation").status.name == "ready"
    expected, wait = [], FIRST_POLL
    for _ in range(12):
        expected.append(round(wait, 6))
        wait = min(wait * 2, MAX_POLL)
    assert clock.sleeps == expected and net.calls == 13


def test_first_wait_delays_the_first_poll() -> None:
    """A first_wait (what the CA's previous answer asked for) delays the first poll."""
    order, clock, net = _order([("valid", None)])
    order.poll("https://ca.test/order/1", "issuance", first_wait=0.002)
    assert clock.sleeps == [0.002] and net.calls == 1


@pytest.mark.parametrize("finalize_retry_after, sleeps", [
    (None, []),            # no fixed wait per certificate: the CA said nothing, so ask at once
    ("1", [1.0]),          # the finalize answer's Retry-After sets the first poll
    ("600", [MAX_RETRY_AFTER]),
])
def test_after_finalize_the_first_poll_waits_only_for_what_the_ca_asked(
        finalize_retry_after: str | None, sleeps: list[float]) -> None:
    """After finalize answers "processing", the first poll is at once, or after its Retry-After."""
    key = keys.generate_private_key("ecdsa-p256")
    order, clock, net = _order([("processing", finalize_retry_after), ("valid", None), ("valid", None)])
    ready = messages.Order.from_json({"status": "ready", "identifiers": [], "authorizations": [],
                                      "finalize": "https://ca.test/finalize"})
    order.complete("https://ca.test/order/1", ready, keys.make_csr(key, ["www.example.test"]))
    assert clock.sleeps == sleeps and net.calls == 3  # finalize, one poll, the download


@pytest.mark.parametrize("header, waited", [
    ("1", 1.0),
    ("600", MAX_RETRY_AFTER),
    ("Thu, 01 Jan 2026 00:00:03 GMT", 3.0),   # FakeClock starts at 2026-01-01 00:00:00 UTC
])
def test_retry_after_is_honoured_with_a_cap(header: str, waited: float) -> None:
    """A Retry-After (seconds or HTTP-date) sets the wait, capped at MAX_RETRY_AFTER."""
    order, clock, _ = _order([("processing", header), ("valid", None)])
    order.poll("https://ca.test/order/1", "issuance")
    assert clock.sleeps == [waited]


def test_deadline_ends_polling_with_a_transient_error() -> None:
    """An order still pending at the deadline gives a transient AcmeError saying what it waited for."""
    order, clock, _ = _order([("pending", None)], timeout=5.0)
    with pytest.raises(AcmeError, match=r"issuing www: still waiting for validation after 5 s "
                                        r"\(order pending\); will retry") as info:
        order.poll("https://ca.test/order/1", "validation")
    assert info.value.transient
    assert sum(clock.sleeps) == pytest.approx(5.0)


class _AriNet:
    """A CA with a directory naming renewalInfo, which answers with a canned window and Retry-After."""

    def __init__(self, start: str, end: str, retry_after: str | None) -> None:
        self.body = {"suggestedWindow": {"start": start, "end": end}}
        self.retry_after = retry_after
        self.asked: list[str] = []

    def get(self, url: str, **_: Any) -> requests.Response:
        self.asked.append(url)
        response = requests.Response()
        response.status_code = 200
        if url == "https://ca.test/dir":
            response._content = json.dumps({"renewalInfo": "https://ca.test/ari/"}).encode()
            return response
        response._content = json.dumps(self.body).encode()
        if self.retry_after is not None:
            response.headers["Retry-After"] = self.retry_after
        return response

    def close(self) -> None:
        pass


class _OneNetTransport:
    """A Transport whose every network is ``net`` (the issuer asks one per thread)."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def network(self) -> Any:
        return self.net

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _renewal_info(start: str, end: str, retry_after: str | None) -> Any:
    from tests.support.certs import make_bundle
    clock = FakeClock()
    net = _AriNet(start, end, retry_after)
    issuer = Issuer(AcmeConfig(directory="https://ca.test/dir"), accounts=None, clock=clock,  # type: ignore[arg-type]
                    transport=_OneNetTransport(net))
    bundle = make_bundle(("www.example.test",), not_before=clock.now(), days=1)
    info = issuer.renewal_info(bundle.cert_pem)
    assert net.asked[0] == "https://ca.test/dir" and net.asked[1].startswith("https://ca.test/ari/")
    return info, clock


def test_an_ari_window_ending_at_or_before_its_start_is_a_failed_fetch() -> None:
    """RFC 9773 §4.2: end must be after start; an empty window is not "renew at that instant"."""
    with pytest.raises(AcmeError, match="no valid suggestedWindow"):
        _renewal_info("2026-01-02T00:00:00Z", "2026-01-02T00:00:00Z", None)


def test_ari_retry_after_is_passed_on_unclamped_for_the_one_clamp_in_the_scheduler() -> None:
    """A 10-second Retry-After reaches the scheduler as 10 s (certd/acme/issuer.py's flat [1 min, 1 day]
    copy is gone): policy.ari_poll_interval alone bounds it by the lifetime."""
    from datetime import timedelta

    from certd.core.policy import ari_poll_interval
    info, clock = _renewal_info("2026-01-02T00:00:00Z", "2026-01-02T06:00:00Z", "10")
    assert info.retry_after == clock.now() + timedelta(seconds=10)
    lifetime = timedelta(minutes=2)  # a 2-minute certificate: polled every 12 s at most
    assert ari_poll_interval(info.retry_after, clock.now(), lifetime) == timedelta(seconds=12)
    none, clock = _renewal_info("2026-01-02T00:00:00Z", "2026-01-02T06:00:00Z", None)
    assert none.retry_after is None
