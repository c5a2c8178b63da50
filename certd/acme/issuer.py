"""ACME (RFC 8555) issuance, renewal information (RFC 9773) and revocation.

Built on the ``acme`` library's protocol objects and (through :mod:`certd.acme.transport`) its
``ClientNetwork`` for JWS signing and nonces, but not on its order flow, because of speed:
``ClientV2.poll_and_finalize`` sleeps a fixed second between polls, while a local Pebble needs
~15 ms for a whole order. :class:`_Order` polls the *order* (one request whatever the number of
names: its status turns ``ready`` once every authorization is valid) on a short, growing
schedule, honours ``Retry-After`` (capped), and gives up at an overall deadline measured on
the injected :class:`~certd.core.clock.Clock`.

Threads: ``issue()`` runs in up to 8 threads at once. Each thread has its own network object
(its own keep-alive connection and nonce pool); they share the directory, fetched once per
:class:`Issuer`, and the account (key + URL), set up once under a lock. No lock is held while
talking to the CA.

The account lives in an :class:`AccountStore`, one per directory URL. If the CA no longer
knows it (Pebble restarted: fresh state), the same key is registered again and saved, and the
order is retried once.

Every failure leaves as one certd error, mapped in :class:`certd.acme.transport.Failure`: the CA is
not reachable (:class:`CANotReachable`), the CA said no (:class:`AcmeError` with the problem
type), or validation failed (:class:`ChallengeFailed`, naming domain, challenge and the CA's
reason). Messages are one line ending with what happens next, and never hold key material.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certd import __version__
from certd.acme.transport import (NEXT_STEP, AcmeNetwork, Failure, one_line, problem_code, problem_detail, proxied,
                           retry_after_seconds)
from certd.core.clock import Clock, utc
from certd.config import AcmeConfig, CertificateConfig
from certd.core.errors import AcmeError, CANotReachable, ChallengeFailed, ConfigError
from certd.crypto.keys import make_csr
from certd.core.retry import CHALLENGE, FINALIZE, NEW_ORDER
from certd.core.model import split_pem_chain
from certd.acme.solvers import Solver, solver_for

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format

DEFAULT_USER_AGENT = f"certd/{__version__}"
ORDER_TIMEOUT = AcmeConfig.order_timeout   # default seconds for one whole order ([acme] order_timeout)
NETWORK_TIMEOUT = 30         # seconds for one HTTP request
# Poll schedule: first poll soon (a local CA validates in milliseconds), then back off.
FIRST_POLL = 0.004
ISSUE_WAIT = 0.002           # after finalize, before the first poll
POLL_GROWTH = 2.0
MAX_POLL = 2.0
MAX_RETRY_AFTER = 15.0       # never wait longer than this for one poll, whatever the CA says

_FINAL_CHALLENGE_PROBLEMS = {"caa", "rejectedIdentifier", "unsupportedIdentifier"}


@dataclass(frozen=True)
class RenewalInfo:
    """The CA's suggested renewal window for one certificate (RFC 9773 §4.2)."""

    window_start: datetime      # aware UTC
    window_end: datetime        # aware UTC
    retry_after: datetime | None  # aware UTC: when the CA asks to be asked again (None: it did not
    #                               say); clamped in one place, certd.core.policy.ari_poll_interval
    explanation_url: str | None


class AccountStore(Protocol):
    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        """(account key PEM, registration JSON) for ``directory_url``, or None."""

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        """Remember the account (the key file must be 0600)."""


class ReplacingOrder(messages.NewOrder):
    """newOrder with RFC 9773 §5 ``replaces`` (acme 5.9 has no such field)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def ari_cert_id(cert_pem: bytes) -> str:
    """RFC 9773 §4.1 certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial).

    The serial is the content of its DER INTEGER: big-endian two's complement, so a serial whose
    top bit is set gets a leading zero byte.
    """
    blocks = split_pem_chain(cert_pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    cert = x509.load_pem_x509_certificate(blocks[0])
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    if not aki:
        raise ValueError("the certificate has no authority key identifier; it has no ARI identifier")
    serial = cert.serial_number
    serial_der = serial.to_bytes(max(1, math.ceil((serial.bit_length() + 1) / 8)), "big", signed=True)
    return f"{_b64(aki)}.{_b64(serial_der)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# --- the issuer --------------------------------------------------------------------------------


class Issuer:
    """Talks to one ACME CA for one account. Thread-safe; see the module docstring."""

    def __init__(self, acme: AcmeConfig, accounts: AccountStore, clock: Clock, *,
                 user_agent: str = DEFAULT_USER_AGENT, order_timeout: float | None = None,
                 network_timeout: int = NETWORK_TIMEOUT,
                 on_request: Callable[[float], None] | None = None) -> None:
        """``on_request`` is told the duration (seconds) of every HTTP request to the CA."""
        self._acme = acme
        self._on_request = on_request
        self._accounts = accounts
        self._clock = clock
        self._user_agent = user_agent
        self._order_timeout = acme.order_timeout if order_timeout is None else order_timeout
        self._network_timeout = network_timeout
        self._verify: bool | str = str(acme.ca_bundle) if acme.ca_bundle else True
        self._lean = not proxied(acme.directory)   # with a proxy, plain requests does the work
        self._fail = Failure(acme.directory, clock)
        self._lock = threading.Lock()          # directory and account set-up only
        self._local = threading.local()
        self._networks: weakref.WeakSet[AcmeNetwork] = weakref.WeakSet()
        self._networks_lock = threading.Lock()
        self._directory: messages.Directory | None = None
        self._key: jose.JWK | None = None
        self._raw_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
        self._alg: jose.JWASignature = jose.ES256
        self._regr: messages.RegistrationResource | None = None

    # -- public API --

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None,
              progress: Callable[[str], None] | None = None) -> bytes:
        """Order, validate, finalize and download a certificate for ``cert.domains``.

        Returns the full chain PEM exactly as the CA sent it (check it with
        :func:`certd.crypto.certcheck.check_issued`). ``replaces`` is the ARI identifier of the
        certificate this one renews (RFC 9773 §5); if the CA refuses it, the order is placed
        again without it.
        """
        say = progress or (lambda _msg: None)
        doing = f"issuing {cert.name}"
        deadline = self._clock.monotonic() + self._order_timeout
        csr_pem = make_csr(key_pem, cert.domains)
        solver = solver_for(cert)
        try:
            for attempt in (1, 2):
                with self._mapped(doing):
                    # Every request of the order ends by the deadline, even one the CA answers
                    # a byte at a time (the poll loop alone only checks between requests).
                    net = self._network()
                    net.time_left = lambda: deadline - self._clock.monotonic()
                    try:
                        client = self._client()
                        used_account = client.net.account
                        return _Order(self, client, cert, solver, say, deadline).run(csr_pem, replaces)
                    except messages.Error as e:
                        if problem_code(e) != "accountDoesNotExist" or attempt == 2:
                            raise
                    finally:
                        net.time_left = None
                    log.warning("account_unknown directory=%s: the CA no longer knows account %s; "
                                "registering again", self._acme.directory, used_account.uri if used_account else "?")
                    self._reregister(used_account)
        except CANotReachable as e:
            if self._clock.monotonic() < deadline:
                raise
            raise AcmeError(f"{doing}: no certificate within the {self._order_timeout:g} s order deadline "
                            f"([acme] order_timeout): the CA at {self._acme.directory} answers too slowly; "
                            "will retry", transient=True) from e
        raise AssertionError("unreachable")

    def renewal_info(self, cert_pem: bytes) -> RenewalInfo | None:
        """The CA's renewal window for ``cert_pem`` (RFC 9773).

        None when the CA has no ``renewalInfo``, the certificate has no authority key
        identifier, or it has expired (RFC 9773 §4.3: clients must not ask then; renew now).
        """
        try:
            cert_id = ari_cert_id(cert_pem)
        except ValueError as e:
            log.debug("no ARI for this certificate: %s", e)
            return None
        cert = x509.load_pem_x509_certificate(split_pem_chain(cert_pem)[0])
        if cert.not_valid_after_utc <= self._clock.now():
            return None
        with self._mapped("fetching renewal information"):
            directory = self._get_directory()
            try:
                base = directory["renewalInfo"]
            except KeyError:
                return None
            url = f"{str(base).rstrip('/')}/{cert_id}"
            response = self._network().get(url, content_type=acme_client.ClientNetwork.JSON_CONTENT_TYPE)
            body = response.json()
            window = messages.RenewalInfo.from_json(body).suggested_window
            if window.start is None or window.end is None or window.end <= window.start:
                raise AcmeError("fetching renewal information: the CA sent no valid suggestedWindow "
                                "(RFC 9773 §4.2); will retry", transient=True)
            now = self._clock.now()
            wait = retry_after_seconds(response.headers.get("Retry-After"), now)
            explanation = body.get("explanationURL") if isinstance(body, dict) else None
            return RenewalInfo(window_start=utc(window.start), window_end=utc(window.end),
                               retry_after=None if wait is None else now + timedelta(seconds=wait),
                               explanation_url=explanation if isinstance(explanation, str) else None)

    def revoke(self, cert_pem: bytes, reason: int) -> None:
        """Revoke ``cert_pem`` (RFC 5280 reason code) with the account key."""
        cert = x509.load_pem_x509_certificate(split_pem_chain(cert_pem)[0])
        with self._mapped(f"revoking certificate {cert.serial_number:x}"):
            client = self._client()
            try:
                _post(client, self._get_directory()["revokeCert"],
                      messages.Revocation(certificate=cert, reason=reason))
            except messages.Error as e:
                if problem_code(e) != "alreadyRevoked":
                    raise
                log.info("certificate %x was already revoked", cert.serial_number)

    def close(self) -> None:
        """Close every HTTP connection this issuer opened (it can still be used afterwards)."""
        with self._networks_lock:
            networks = list(self._networks)
        for net in networks:
            try:
                net.session.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # -- account and transport --

    @contextmanager
    def _mapped(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (AcmeError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes one certd error
            raise self._fail(e, doing) from e

    def _network(self) -> AcmeNetwork:
        net: AcmeNetwork | None = getattr(self._local, "net", None)
        if net is None:
            net = self._new_network(None)
            self._local.net = net
        return net

    def _new_network(self, key: jose.JWK | None) -> AcmeNetwork:
        net = AcmeNetwork(key, alg=self._alg, verify_ssl=self._verify, user_agent=self._user_agent,
                          timeout=self._network_timeout, lean=self._lean,
                          on_request=self._on_request, clock=self._clock)
        net.directory_url = self._acme.directory  # every URL the CA hands out must share its origin
        with self._networks_lock:
            self._networks.add(net)
        return net

    def _get_directory(self) -> messages.Directory:
        directory = self._directory
        if directory is None:
            with self._lock:
                if self._directory is None:
                    self._directory = acme_client.ClientV2.get_directory(self._acme.directory, self._network())
                directory = self._directory
        return directory

    def _client(self) -> acme_client.ClientV2:
        """This thread's client, signed with the (set up once) account."""
        directory = self._get_directory()
        if self._regr is None:
            with self._lock:
                if self._regr is None:
                    self._load_or_register(directory)
        client: acme_client.ClientV2 | None = getattr(self._local, "client", None)
        if client is None:
            client = acme_client.ClientV2(directory, self._network())
            self._local.client = client
        with self._lock:  # key, alg and account change together (re-registration)
            client.net.key, client.net.alg, client.net.account = self._key, self._alg, self._regr
        return client

    def _account_lock(self) -> AbstractContextManager[None]:
        """Registration is serialized across processes when the store can (FileStore.account_lock)."""
        lock = getattr(self._accounts, "account_lock", None)
        return lock(self._acme.directory) if lock is not None else nullcontext()

    def _load_or_register(self, directory: messages.Directory) -> None:
        with self._account_lock():
            if self._load_stored():
                return
            key = ec.generate_private_key(ec.SECP256R1())
            self._set_key(key)
            self._register(directory, key)

    def _load_stored(self, unless_uri: str | None = None) -> bool:
        """Use the stored account, if there is one (and it is not ``unless_uri``)."""
        stored = self._accounts.load_account(self._acme.directory)
        if stored is None:
            return False
        key_pem, regr_json = stored
        regr = messages.RegistrationResource.json_loads(regr_json)
        if unless_uri is not None and regr.uri == unless_uri:
            return False
        self._set_key(serialization.load_pem_private_key(key_pem, password=None))
        self._regr = regr
        log.debug("account_loaded directory=%s account=%s", self._acme.directory, regr.uri)
        return True

    def _set_key(self, key: Any) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algs = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
            if key.curve.name not in algs:
                raise ConfigError(f"the stored ACME account key uses curve {key.curve.name}; "
                                  "remove the account directory to register a new account")
            self._key, self._alg = jose.JWKEC(key=key), algs[key.curve.name]
        elif isinstance(key, rsa.RSAPrivateKey):
            self._key, self._alg = jose.JWKRSA(key=key), jose.RS256
        else:
            raise ConfigError("the stored ACME account key is neither EC nor RSA; "
                              "remove the account directory to register a new account")
        self._raw_key = key

    def _register(self, directory: messages.Directory, key: Any) -> None:
        """newAccount with ``key`` (caller holds the lock); saves the account."""
        acme = self._acme
        meta = directory.meta
        tos = getattr(meta, "terms_of_service", None)
        eab = None
        assert self._key is not None  # _set_key ran before registering
        if acme.eab_kid and acme.eab_hmac_key:
            try:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=self._key.public_key(), kid=acme.eab_kid,
                    hmac_key=acme.eab_hmac_key, directory=directory)
            except (ValueError, TypeError, jose.DeserializationError):
                raise ConfigError("[acme] eab_hmac_key: not valid base64url; copy the HMAC key exactly "
                                  "as the CA shows it") from None
        elif getattr(meta, "external_account_required", False):
            raise ConfigError(f"[acme] eab_kid: the CA at {acme.directory} requires External Account "
                              "Binding; set eab_kid and eab_hmac_key from your CA account")
        registration = messages.NewRegistration.from_data(
            email=acme.email, terms_of_service_agreed=True if acme.agree_tos else None,
            external_account_binding=eab)
        net = self._new_network(self._key)
        net.time_left = self._network().time_left  # the order's deadline bounds badNonce retries too
        try:
            regr = acme_client.ClientV2(directory, net).new_account(registration)
        except acme_errors.ConflictError as e:
            # 200 + Location (RFC 8555 §7.3.1): the CA already has this key — a registration whose
            # answer was lost (disk full, SIGKILL before save_account). Adopt and save that account.
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            log.warning("account_adopted directory=%s account=%s: the CA already knew this key", acme.directory,
                        e.location)
        except messages.Error as e:
            if not acme.agree_tos and (tos or problem_code(e) == "userActionRequired"
                                       or "terms" in (e.detail or "").lower()):
                raise ConfigError(f"[acme] agree_tos: the CA at {acme.directory} requires agreeing to its "
                                  f"terms of service{f' ({tos})' if tos else ''}; read them and set "
                                  "agree_tos = true") from None
            raise self._fail(e, f"registering an ACME account at {acme.directory}") from e
        finally:
            net.session.close()
        # Pebble echoes the EAB back; josepy decodes it into a frozendict it cannot serialize again.
        regr = regr.update(body=regr.body.update(external_account_binding=None))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self._accounts.save_account(acme.directory, key_pem, regr.json_dumps())
        self._regr = regr
        log.info("account_registered directory=%s account=%s", acme.directory, regr.uri)

    def _reregister(self, stale: messages.RegistrationResource | None) -> None:
        """Register the same key again, unless another thread already did."""
        directory = self._get_directory()
        with self._lock:
            if self._regr is not stale:
                return
            with self._account_lock():
                # Another process may have registered again meanwhile: use what it saved.
                if self._load_stored(unless_uri=stale.uri if stale is not None else None):
                    return
                assert self._raw_key is not None  # set with the account that went stale
                self._register(directory, self._raw_key)


# --- one order ---------------------------------------------------------------------------------


def _post(client: acme_client.ClientV2, url: str, obj: Any) -> requests.Response:
    return client.net.post(url, obj, new_nonce_url=client.directory["newNonce"])


def _get(client: acme_client.ClientV2, url: str) -> requests.Response:
    """POST-as-GET (RFC 8555 §6.3)."""
    return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])


class _Order:
    """newOrder -> challenges -> poll -> finalize -> poll -> download, for one certificate."""

    def __init__(self, issuer: Issuer, client: acme_client.ClientV2, cert: CertificateConfig,
                 solver: Solver, say: Callable[[str], None], deadline: float) -> None:
        self.issuer, self.client, self.cert, self.solver = issuer, client, cert, solver
        self.say, self.deadline = say, deadline
        self.clock = issuer._clock
        self.doing = f"issuing {cert.name}"

    def run(self, csr_pem: bytes, replaces: str | None) -> bytes:
        with _where(NEW_ORDER):
            uri, order = self.create(replaces)
        self.say(f"order {uri} created ({order.status.name})")
        if order.status.name == "pending":
            order = self.validate(uri, order)
        if order.status.name == "ready":
            csr = x509.load_pem_x509_csr(csr_pem)
            with _where(FINALIZE):
                order = messages.Order.from_json(
                    _post(self.client, order.finalize, messages.CertificateRequest(csr=csr)).json())
            self.say("finalizing")
            if order.status.name in ("ready", "processing"):
                # Issuing takes a CA a moment (Pebble: ~3 ms); asking at once is a wasted request.
                order = self.poll(uri, "the CA to issue the certificate", first_wait=ISSUE_WAIT)
        if order.status.name != "valid" or not order.certificate:
            raise self.order_failed(order)
        fullchain = _get(self.client, order.certificate).content
        self.say("certificate downloaded")
        return fullchain

    def create(self, replaces: str | None) -> tuple[str, messages.Order]:
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in self.cert.domains]
        url = self.client.directory["newOrder"]
        if replaces:
            try:
                response = _post(self.client, url, ReplacingOrder(identifiers=identifiers, replaces=replaces))
            except messages.Error as e:
                # replaces is advisory (RFC 9773 §5): a CA that cannot use it (already replaced,
                # a certificate it does not know, Pebble 2.6 failing every serial whose DER
                # encoding needs a leading zero byte with serverInternal) must not block the
                # renewal for ever. Only problems that would hit any order are raised as they are.
                code = problem_code(e)
                if code in ("rateLimited", "accountDoesNotExist", "badNonce"):
                    raise
                log.warning("replaces_refused certificate=%s replaces=%s problem=%s detail=%s; "
                            "ordering without replaces", self.cert.name, replaces, code, one_line(e.detail or ""))
                self.say(f"the CA refused replaces ({code}); ordering without it")
                response = _post(self.client, url, messages.NewOrder(identifiers=identifiers))
        else:
            response = _post(self.client, url, messages.NewOrder(identifiers=identifiers))
        return response.headers["Location"], messages.Order.from_json(response.json())

    def validate(self, uri: str, order: messages.Order) -> messages.Order:
        """Present and answer every pending authorization's challenge, then wait for the order."""
        authzs = [(url, messages.Authorization.from_json(_get(self.client, url).json()))
                  for url in order.authorizations]
        work = []
        for _url, authz in authzs:
            if authz.status.name == "valid":
                continue
            if authz.status.name != "pending":
                raise self.authz_failed(authz)
            challb = next((c for c in authz.challenges if c.chall.typ == self.solver.challenge_type), None)
            if challb is None:
                offered = ", ".join(sorted({c.typ for c in authz.challenges})) or "none"
                raise AcmeError(f"{self.doing}: the CA offers no {self.solver.challenge_type} challenge for "
                                f"{_authz_name(authz)} (offers {offered}); choose another challenge")
            work.append((authz.identifier.value, challb))
        if not work:
            return self.poll(uri, "the order to become ready")
        key = self.client.net.key
        assert key is not None  # the issuer sets the account key before any order
        presented: list[tuple[str, messages.ChallengeBody]] = []
        try:
            self.present_all(work, key, presented)
            for _domain, challb in work:
                _post(self.client, challb.uri, challb.chall.response(key))
            self.say(f"answered {len(work)} {self.solver.challenge_type} challenge(s)")
            order = self.poll(uri, "validation")
        finally:
            self.side_by_side([functools.partial(self.solver.cleanup, d, c.chall, key) for d, c in presented])
        if order.status.name == "invalid":
            for url, _authz in authzs:
                authz = messages.Authorization.from_json(_get(self.client, url).json())
                if authz.status.name == "invalid":
                    raise self.authz_failed(authz)
        return order

    def present_all(self, work: Sequence[tuple[str, messages.ChallengeBody]], key: jose.JWK,
                    presented: list[tuple[str, messages.ChallengeBody]]) -> None:
        """Present every challenge, recording in ``presented`` what needs a cleanup."""
        def one(domain: str, challb: messages.ChallengeBody) -> None:
            self.solver.present(domain, challb.chall, key)
            presented.append((domain, challb))

        self.side_by_side([functools.partial(one, d, c) for d, c in work])

    def side_by_side(self, calls: Sequence[Callable[[], None]]) -> None:
        """Run ``calls``; hooks (dns-01: a process each) run in parallel, the rest in turn.

        Raises the first failure once every call has finished.
        """
        if len(calls) <= 1 or self.solver.challenge_type != "dns-01":
            for call in calls:
                call()
            return
        with ThreadPoolExecutor(max_workers=min(8, len(calls)), thread_name_prefix="certd-solver") as pool:
            futures = [pool.submit(call) for call in calls]
        for future in futures:
            future.result()

    def poll(self, uri: str, waiting_for: str, first_wait: float = 0.0) -> messages.Order:
        """Poll the order until it leaves pending/processing, within the deadline.

        Waits grow from :data:`FIRST_POLL` by :data:`POLL_GROWTH` up to :data:`MAX_POLL`, but are
        never shorter than two round trips of the last poll: milliseconds against a local CA,
        a polite pace against a distant one. A Retry-After from the CA wins (up to
        :data:`MAX_RETRY_AFTER`).
        """
        delay = FIRST_POLL
        if first_wait > 0:
            self.clock.sleep(min(first_wait, max(0.0, self.deadline - self.clock.monotonic())))
        while True:
            sent = self.clock.monotonic()
            response = _get(self.client, uri)
            order = messages.Order.from_json(response.json())
            if order.status.name not in ("pending", "processing"):
                return order
            now = self.clock.monotonic()
            wait = max(delay, 2 * (now - sent))
            asked = retry_after_seconds(response.headers.get("Retry-After"), self.clock.now())
            if asked is not None:
                wait = max(wait, min(asked, MAX_RETRY_AFTER))
            wait = min(wait, self.deadline - now)
            if wait <= 0:
                raise AcmeError(f"{self.doing}: still waiting for {waiting_for} after "
                                f"{self.issuer._order_timeout:g} s (order {order.status.name}); will retry",
                                transient=True)
            self.clock.sleep(wait)
            delay = min(delay * POLL_GROWTH, MAX_POLL)

    def authz_failed(self, authz: messages.Authorization) -> AcmeError:
        name = _authz_name(authz)
        failed = next((c for c in authz.challenges if c.error is not None), None)
        if failed is None:
            return AcmeError(f"{self.doing}: the authorization for {name} is {authz.status.name} "
                             "without a reason from the CA; will retry", transient=True)
        problem = failed.error
        assert problem is not None  # chosen above for its error
        code = problem_code(problem)
        final = code in _FINAL_CHALLENGE_PROBLEMS
        return ChallengeFailed(
            f"{self.doing}: the CA could not validate {failed.chall.typ} for {name} ({code}): "
            f"{problem_detail(problem)}; {NEXT_STEP.get(code, 'fix what the CA names') if final else 'will retry'}",
            problem_type=problem.typ, detail=problem.detail, transient=not final, where=CHALLENGE)

    def order_failed(self, order: messages.Order) -> AcmeError:
        if order.error is not None:
            error = self.issuer._fail.problem(order.error, f"{self.doing}: the order is {order.status.name}")
            error.where = FINALIZE
            return error
        return AcmeError(f"{self.doing}: the order ended {order.status.name} without a certificate; will retry",
                         transient=True)


@contextmanager
def _where(step: str) -> Iterator[None]:
    """Mark a CA problem raised inside with the order ``step`` it answered (certd.core.retry's table)."""
    try:
        yield
    except messages.Error as e:
        if getattr(e, "certd_where", None) is None:
            e.certd_where = step
        raise


def _authz_name(authz: messages.Authorization) -> str:
    value = authz.identifier.value if authz.identifier else "?"
    return f"*.{value}" if authz.wildcard else value
