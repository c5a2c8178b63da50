"""The ACME transport without a network: error mapping, badNonce retries, the origin check."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import josepy as jose
import pytest
import requests
from acme import messages

from certd.acme.problems import Failure, problem_code
from certd.acme.transport import AcmeNetwork, check_origin
from certd.core.clock import FakeClock
from certd.core.errors import AcmeError, CANotReachable

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)
DIRECTORY = "https://acme.example.test/dir"


@pytest.fixture
def fail() -> Failure:
    return Failure(DIRECTORY, FakeClock(NOW))


def _problem(code: str, detail: str = "no", retry_after: str | None = None, **kw: object) -> messages.Error:
    error = messages.Error(typ=f"urn:ietf:params:acme:error:{code}", detail=detail, **kw)
    error.retry_after = retry_after
    return error


@pytest.mark.parametrize("code, transient, next_step", [
    ("rateLimited", True, "will retry after 13:00 UTC"),
    ("serverInternal", True, "will retry"),
    ("badNonce", True, "will retry"),
    ("unauthorized", False, "the CA does not allow this account to do that"),
    ("rejectedIdentifier", False, "change the domains"),
    ("caa", False, "fix the CAA records"),
    ("externalAccountRequired", False, "set eab_kid and eab_hmac_key"),
    ("somethingNew", False, "see the CA's documentation of this problem"),
])
def test_problem_types_map_to_transience_and_next_step(fail: Failure, code: str, transient: bool,
                                                       next_step: str) -> None:
    """Each RFC 8555 problem type decides transience; the message ends with what happens next."""
    error = fail(_problem(code, "the detail\nacross lines", retry_after="3600"), "issuing www")
    assert isinstance(error, AcmeError) and not isinstance(error, CANotReachable)
    assert error.transient is transient
    assert error.problem_type == f"urn:ietf:params:acme:error:{code}"
    assert error.detail == "the detail\nacross lines"
    msg = str(error)
    assert msg.startswith(f"issuing www: the CA refused ({code}): the detail across lines; ")
    assert msg.endswith(next_step) or next_step in msg
    assert "\n" not in msg


def test_rate_limit_carries_retry_after(fail: Failure) -> None:
    """rateLimited keeps the CA's Retry-After (seconds or HTTP-date) as seconds."""
    assert fail(_problem("rateLimited", retry_after="90"), "x").retry_after == 90.0  # type: ignore[union-attr]
    dated = fail(_problem("rateLimited", retry_after="Mon, 04 May 2026 12:30:00 GMT"), "x")
    assert dated.retry_after == 1800.0  # type: ignore[union-attr]
    assert "will retry after 12:30 UTC" in str(dated)


def test_subproblems_are_summarised(fail: Failure) -> None:
    """The first subproblem (with its identifier) is named, and how many more there are."""
    sub = [messages.Error(typ="urn:ietf:params:acme:error:caa", detail="CAA forbids",
                          identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="a.example.test")),
           messages.Error(typ="urn:ietf:params:acme:error:dns", detail="SERVFAIL")]
    msg = str(fail(_problem("compound", "several", subproblems=tuple(sub)), "issuing www"))
    assert "several [a.example.test: caa: CAA forbids; 1 more]" in msg


@pytest.mark.parametrize("exc, why", [
    (requests.exceptions.ConnectionError("ConnectionRefusedError: [Errno 111] Connection refused"),
     "connection refused"),
    (requests.exceptions.Timeout("timed out"), "timed out"),
    (requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
     "TLS error: its certificate is not trusted; set [acme] ca_bundle"),
    (requests.exceptions.ConnectionError("something odd"), "connection failed"),
])
def test_transport_failures_are_ca_not_reachable(fail: Failure, exc: Exception, why: str) -> None:
    """Transport failures become a transient CANotReachable naming the server and the reason."""
    error = fail(exc, "issuing www")
    assert isinstance(error, CANotReachable) and error.transient
    assert str(error) == f"ACME server {DIRECTORY} is not reachable ({why}); will retry"


def test_conflict_keeps_its_problem_document() -> None:
    """A 409 with a problem document raises that problem (the library would raise a bare ConflictError)."""
    response = requests.Response()
    response.status_code = 409
    response.headers["Content-Type"] = "application/problem+json"
    response._content = b'{"type": "urn:ietf:params:acme:error:alreadyReplaced", "detail": "replaced"}'
    with pytest.raises(messages.Error) as info:
        AcmeNetwork._check_response(response)
    assert problem_code(info.value) == "alreadyReplaced"


class _NonceRejecting(AcmeNetwork):
    """An AcmeNetwork whose server rejects the first ``rejections`` nonces (no network)."""

    def __init__(self, rejections: int) -> None:
        self.rejections, self.sent = rejections, 0

    def _post_once(self, *args: object, **kwargs: object) -> requests.Response:
        self.sent += 1
        if self.sent <= self.rejections:
            raise _problem("badNonce")
        return requests.Response()


def test_twenty_rejected_nonces_in_a_row_still_go_through() -> None:
    """At PEBBLE_WFE_NONCEREJECT=50, 12 tries failed one request in 4096; a long unlucky run now passes."""
    net = _NonceRejecting(20)
    net.post("https://acme.example.test/x", None)
    assert net.sent == 21


def test_a_server_rejecting_every_nonce_fails_after_a_bounded_number_of_tries() -> None:
    """A CA (or proxy) that rejects every nonce gives the badNonce problem after BAD_NONCE_ATTEMPTS tries."""
    from certd.acme.transport import BAD_NONCE_ATTEMPTS
    net = _NonceRejecting(10**6)
    with pytest.raises(messages.Error):
        net.post("https://acme.example.test/x", None)
    assert net.sent == BAD_NONCE_ATTEMPTS


def test_inside_an_order_bad_nonces_are_retried_until_its_deadline_not_a_count() -> None:
    """At 90 % rejection a request needs ~10 tries and 24 were not always enough: inside an
    order (time_left set) the deadline bounds the retries, not a count."""
    from certd.acme.transport import BAD_NONCE_ATTEMPTS
    net = _NonceRejecting(BAD_NONCE_ATTEMPTS * 3)
    net.time_left = lambda: 5.0
    net.post("https://acme.example.test/x", None)
    assert net.sent == BAD_NONCE_ATTEMPTS * 3 + 1

    budget = iter([1.0] * 40 + [0.0] * 10)
    stuck = _NonceRejecting(10**6)
    stuck.time_left = lambda: next(budget)
    with pytest.raises(messages.Error):
        stuck.post("https://acme.example.test/x", None)
    assert stuck.sent == 41  # stops once the order's time is up


@pytest.mark.parametrize("url", [
    "https://127.0.0.1:14000/order/1", "https://127.0.0.1:14000/finalize/x?y=1", "HTTPS://127.0.0.1:14000/cert/1",
])
def test_urls_on_the_directorys_origin_are_fetched(url: str) -> None:
    """Order, finalize, certificate ... URLs on the CA's own scheme, host and port pass."""
    check_origin(url, "https://127.0.0.1:14000/dir")


@pytest.mark.parametrize("url, said", [
    ("http://127.0.0.1:14000/order/1", "outside its directory's origin https://127.0.0.1:14000"),
    ("https://127.0.0.1:8080/chall/1", "outside its directory's origin"),
    ("https://169.254.169.254/latest/meta-data", "outside its directory's origin"),
    ("https://ca.example.test:14000/authz/1", "outside its directory's origin"),
    ("file:///etc/shadow", "will not fetch"),
])
def test_a_url_off_the_directorys_origin_is_refused_and_not_retried(url: str, said: str) -> None:
    """A CA (or whoever speaks for it) cannot send certd to another server or to plain http."""
    with pytest.raises(AcmeError) as e:
        check_origin(url, "https://127.0.0.1:14000/dir")
    assert said in str(e.value) and not e.value.transient


def test_plain_http_is_only_for_a_loopback_directory() -> None:
    """http:// works with a local test CA; a remote one must use https://."""
    check_origin("http://127.0.0.1:14000/order/1", "http://127.0.0.1:14000/dir")
    check_origin("http://[::1]:14000/order/1", "http://[::1]:14000/dir")
    with pytest.raises(AcmeError, match="plain http:// on a non-loopback host"):
        check_origin("http://ca.example.test/order/1", "http://ca.example.test/dir")


def test_the_network_refuses_a_foreign_url_before_sending_anything() -> None:
    """The check sits where every request is sent, so no CA-supplied URL escapes it."""
    sent: list[str] = []

    class Session:
        def request(self, method: str, url: str, *a: Any, **kw: Any) -> Any:
            sent.append(url)
            raise AssertionError("must not be reached")

        def close(self) -> None:
            pass

    net = AcmeNetwork(None, alg=jose.ES256, verify_ssl=True, user_agent="t", timeout=5, clock=FakeClock(), lean=False)
    net.session = Session()  # type: ignore[assignment]
    net.directory_url = "https://127.0.0.1:14000/dir"
    with pytest.raises(AcmeError, match="outside its directory's origin"):
        net._send_request("GET", "https://127.0.0.1:9/elsewhere")
    assert sent == []
