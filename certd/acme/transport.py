"""The ACME transport: signed requests to one CA, and the object that makes them.

:class:`AcmeTransport` is what :class:`~certd.acme.issuer.Issuer` is given (tests give it a
fake): it makes one :class:`AcmeNetwork` per thread, each with its own keep-alive connection
and nonce pool, probes the CA's directory, and closes them all.

:class:`AcmeNetwork` is ``acme.client.ClientNetwork`` (JWS signing, nonces) with three changes:

- **Transport.** HTTP over :class:`~certd.acme.http.LeanSession` (see there why), unless a
  proxy is configured for the CA.
- **badNonce.** The library retries once and drops the fresh nonce the error carried; at
  PEBBLE_WFE_NONCEREJECT=50 that fails one request in four. :class:`AcmeNetwork` keeps every
  nonce the server sends (RFC 8555 §6.5) and retries until the order's deadline (outside an
  order: up to :data:`BAD_NONCE_ATTEMPTS` times).
- **409.** The library turns every 409 into a bare ``ConflictError``; with a problem document
  (RFC 9773 ``alreadyReplaced``) the problem is kept.

Every URL the CA hands out must share the directory's origin (:func:`check_origin`).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages

from certd import __version__
from certd.acme.http import LeanSession, proxied
from certd.acme.problems import one_line
from certd.config import AcmeConfig
from certd.config.values import is_loopback
from certd.core.clock import Clock
from certd.core.errors import AcmeError

log = logging.getLogger("certd.acmenet")  # a stable name: it is part of the log format

# At 50 % rejected nonces, 12 tries all failed with p = 1/4096 per request: ~0.25 % of orders
# (8-10 POSTs each) failed on badNonce alone. 24 tries: p = 6e-8 per request; each retry is one
# round trip, and a CA rejecting every nonce (a broken proxy) still fails within seconds.
BAD_NONCE_ATTEMPTS = 24
DEFAULT_USER_AGENT = f"certd/{__version__}"
NETWORK_TIMEOUT = 30         # seconds for one HTTP request
PROBE_TIMEOUT = 5.0          # seconds for the daemon's "is the CA back?" directory GET


class Network(Protocol):
    """What the issuer uses of one thread's network (``ClientNetwork``'s interface)."""

    key: jose.JWK | None
    alg: jose.JWASignature
    account: messages.RegistrationResource | None
    #: Seconds left until the caller's deadline (an order's), or None.
    time_left: Callable[[], float] | None

    def get(self, url: str, content_type: str = ..., **kwargs: Any) -> requests.Response: ...
    def post(self, *args: Any, **kwargs: Any) -> requests.Response: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """How an :class:`~certd.acme.issuer.Issuer` reaches its CA."""

    def network(self) -> Network:
        """A new network (own connection and nonce pool) for one thread; it signs once the
        issuer sets its ``key``, ``alg`` and ``account``."""

    def probe(self) -> bool:
        """True when the CA's directory answers 200 now (one GET, no JWS)."""

    def close(self) -> None:
        """Close every connection the networks made (they can still be used afterwards)."""


class AcmeTransport:
    """The real transport: :class:`AcmeNetwork` objects for the CA at ``directory_url``."""

    def __init__(self, directory_url: str, clock: Clock, *, verify: bool | str = True,
                 user_agent: str = DEFAULT_USER_AGENT, timeout: int = NETWORK_TIMEOUT,
                 on_request: Callable[[float], None] | None = None) -> None:
        """``on_request`` is told the duration (seconds) of every HTTP request to the CA."""
        self.directory_url, self._clock = directory_url, clock
        self._verify, self._user_agent, self._timeout = verify, user_agent, timeout
        self._on_request = on_request
        self._lean = not proxied(directory_url)   # with a proxy, plain requests does the work
        self._networks: weakref.WeakSet[AcmeNetwork] = weakref.WeakSet()
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, acme: AcmeConfig, clock: Clock, *,
                   on_request: Callable[[float], None] | None = None) -> AcmeTransport:
        """The transport ``[acme]`` describes (its directory, and ca_bundle to trust)."""
        return cls(acme.directory, clock, verify=str(acme.ca_bundle) if acme.ca_bundle else True,
                   on_request=on_request)

    def network(self) -> AcmeNetwork:
        net = AcmeNetwork(None, alg=jose.ES256, verify_ssl=self._verify, user_agent=self._user_agent,
                          timeout=self._timeout, clock=self._clock, lean=self._lean, on_request=self._on_request)
        net.directory_url = self.directory_url  # every URL the CA hands out must share its origin
        with self._lock:
            self._networks.add(net)
        return net

    def probe(self) -> bool:
        """One unsigned GET of the directory within :data:`PROBE_TIMEOUT` (not measured as an
        ACME request: it is the daemon asking whether the CA is back)."""
        session: Any = LeanSession(self._clock) if self._lean else requests.Session()
        try:
            response = session.request("GET", self.directory_url, verify=self._verify, timeout=PROBE_TIMEOUT,
                                       headers={"User-Agent": self._user_agent})
        except (requests.exceptions.RequestException, OSError):
            return False
        finally:
            session.close()
        return bool(response.status_code == 200)

    def close(self) -> None:
        with self._lock:
            networks = list(self._networks)
        for net in networks:
            try:
                net.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def url_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit; ValueError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def check_origin(url: str, directory_url: str) -> None:
    """Refuse a URL the CA handed out (order, authorization, challenge, finalize, certificate,
    renewalInfo, a Location) unless it has the directory's scheme, host and port: a CA, or
    whoever speaks for it, must not send certd to another server (a local service, an
    ``http://`` URL where the account's requests would cross the network in clear text).
    ``http://`` is allowed only for a loopback directory (a test CA such as Pebble)."""
    try:
        want = url_origin(directory_url)
        got = url_origin(url)
    except ValueError as e:
        raise AcmeError(f"the CA handed out a URL certd will not fetch ({e}); not retrying") from None
    if want[0] == "http" and not is_loopback(want[1]):
        raise AcmeError(f"ACME directory {directory_url} is plain http:// on a non-loopback host; use https://; "
                        "not retrying")
    if got != want:
        raise AcmeError(f"the CA handed out {one_line(url)[:200]}, outside its directory's origin "
                        f"{want[0]}://{want[1]}:{want[2]}; not fetched (a misconfigured or compromised CA?); "
                        "not retrying")


class AcmeNetwork(acme_client.ClientNetwork):
    """``ClientNetwork`` on a :class:`LeanSession` (unless proxied), with badNonce retries.

    Built on acme's ``ClientNetwork`` internals (``_send_request``, ``_wrap_in_jws``,
    ``_check_response``, ``_post_once``, ``_add_nonce``, ``REPLAY_NONCE_HEADER``), hence the pin
    on ``acme`` in pyproject.toml. tests/unit/test_acme_jws.py sends the same requests through
    this class and the installed library's own, over one fake HTTP layer, and compares the JWS:
    run it before widening the pin.
    """

    def __init__(self, key: jose.JWK | None, *, alg: jose.JWASignature, verify_ssl: bool | str,
                 user_agent: str, timeout: int, clock: Clock, lean: bool = True,
                 on_request: Callable[[float], None] | None = None) -> None:
        super().__init__(key, alg=alg, verify_ssl=verify_ssl, user_agent=user_agent,  # type: ignore[arg-type]
                         timeout=timeout)
        # Told the duration of every HTTP request (answered or not), for the metrics.
        self._on_request, self._clock = on_request, clock
        if lean:
            self.session.close()
            self.session = LeanSession(clock)  # type: ignore[assignment]

    def close(self) -> None:
        """Close this network's connections (it can still be used: it reconnects)."""
        self.session.close()

    #: Seconds left until the caller's deadline (an order's), or None; set per order by the issuer.
    time_left: Callable[[], float] | None = None

    #: The ACME directory's URL: every URL fetched must share its origin (check_origin). Set by the issuer.
    directory_url: str | None = None

    def _timeout_now(self, asked: float | None) -> float:
        """The whole-request timeout: the network timeout, but never past the caller's deadline."""
        timeout = float(asked if asked is not None else self._default_timeout)
        if self.time_left is not None:
            timeout = min(timeout, max(0.001, self.time_left()))
        return timeout

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        """POST, retrying badNonce with the fresh nonce each rejection carries: inside an order
        (``time_left`` set) until its deadline, whatever the count — a CA rejecting 90 % of
        nonces needs ~10 tries a request and ~640 an order — else :data:`BAD_NONCE_ATTEMPTS`."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as e:
                if e.code != "badNonce":
                    raise
                if self.time_left is not None:
                    if self.time_left() <= 0:
                        raise
                elif attempt >= BAD_NONCE_ATTEMPTS:
                    raise
                log.debug("badNonce (attempt %d); retrying with a fresh nonce", attempt)

    # acme annotates ``nonce`` as str, but hands over the decoded bytes (its own Header encodes them).
    def _wrap_in_jws(self, obj: jose.JSONDeSerializable | None, nonce: bytes,  # type: ignore[override]
                     url: str) -> str:
        """RFC 8555 §6.2 flattened JWS, built directly: josepy's object model costs ~1 ms a request.

        Same result as the library's: protected header {alg, nonce, url, kid | jwk}, compact JSON.
        """
        assert self.key is not None
        payload = obj.json_dumps().encode() if obj else b""
        header: dict[str, Any] = {"alg": self.alg.name, "nonce": jose.b64encode(nonce).decode(), "url": url}
        if self.account is not None:
            header["kid"] = self.account["uri"]
        else:  # newAccount (and revocation by certificate key) carry the public key instead
            header["jwk"] = self.key.public_key().to_partial_json()
        protected = jose.b64encode(json.dumps(header, separators=(",", ":")).encode()).decode()
        encoded_payload = jose.b64encode(payload).decode()
        signature = self.alg.sign(self.key.key, f"{protected}.{encoded_payload}".encode())
        return json.dumps({"protected": protected, "payload": encoded_payload,
                           "signature": jose.b64encode(signature).decode()})

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        # The library's version formats every header for a debug line even when nobody logs it.
        if self.directory_url is not None:
            check_origin(url, self.directory_url)
        kwargs["verify"] = self.verify_ssl
        headers = kwargs.setdefault("headers", {})
        headers.setdefault("User-Agent", self.user_agent)
        kwargs["timeout"] = self._timeout_now(kwargs.get("timeout"))
        if self._on_request is None:
            response = self.session.request(method, url, *args, **kwargs)
        else:
            started = self._clock.monotonic()
            try:
                response = self.session.request(method, url, *args, **kwargs)
            finally:
                self._on_request(self._clock.monotonic() - started)
        if "Accept" not in headers:
            response.encoding = "utf-8"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> HTTP %d", method, url, response.status_code)
        if not response.ok and self.REPLAY_NONCE_HEADER in response.headers:
            # Errors carry a fresh nonce too; the library drops it and asks newNonce again.
            try:
                self._add_nonce(response)
            except acme_errors.BadNonce:
                pass
        return response

    @classmethod
    def _check_response(cls, response: requests.Response,
                        content_type: str | None = None) -> requests.Response:
        if response.status_code == 409:
            try:
                problem = messages.Error.from_json(response.json())
            except (ValueError, jose.DeserializationError):
                problem = None
            if problem is not None and problem.typ != "about:blank":
                problem.retry_after = response.headers.get("Retry-After")
                raise problem
        try:
            return super()._check_response(response, content_type=content_type)
        except messages.Error as e:
            e.retry_after = response.headers.get("Retry-After")  # for rateLimited
            raise
