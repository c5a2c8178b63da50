"""The order polling schedule, driven by a fake clock and canned CA answers (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from certd.clock import FakeClock
from certd.config import AcmeConfig, CertificateConfig
from certd.errors import AcmeError
from certd.issuer import FIRST_POLL, MAX_POLL, MAX_RETRY_AFTER, Issuer, _Order


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
        response._content = json.dumps({"status": status, "identifiers": [], "authorizations": [],
                                        "finalize": "https://ca.test/finalize"}).encode()
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response


def _order(answers: list[tuple[str, str | None]], timeout: float = 90.0) -> tuple[_Order, RecordingClock, CannedNet]:
    clock = RecordingClock()
    issuer = Issuer(AcmeConfig(directory="https://ca.test/dir"), accounts=None, clock=clock,  # type: ignore[arg-type]
                    order_timeout=timeout)
    net = CannedNet(answers)
    client = SimpleNamespace(net=net, directory={"newNonce": "https://ca.test/nonce"})
    cert = CertificateConfig(name="www", domains=("www.example.test",), http01_webroot=Path("/tmp"))
    order = _Order(issuer, client, cert, solver=None, say=lambda _m: None,  # type: ignore[arg-type]
                   deadline=clock.monotonic() + timeout)
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
    """After finalize, the first poll comes after first_wait (no wasted request)."""
    order, clock, net = _order([("valid", None)])
    order.poll("https://ca.test/order/1", "issuance", first_wait=0.002)
    assert clock.sleeps == [0.002] and net.calls == 1


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
