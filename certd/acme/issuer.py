"""ACME (RFC 8555) issuance, renewal information (RFC 9773) and revocation, for one CA and
one account, over an injected :class:`~certd.acme.transport.Transport`.

Built on the ``acme`` library's protocol objects and (through the transport) its
``ClientNetwork`` for JWS signing and nonces; the order itself runs in
:class:`~certd.acme.order.OrderFlow`, the account in :class:`~certd.acme.account.Account`,
renewal information in :mod:`certd.acme.ari`.

Threads: ``issue()`` runs in up to 8 threads at once. Each thread has its own network object
(its own keep-alive connection and nonce pool); they share the directory, fetched once per
:class:`Issuer`, and the account (key + URL), set up once under a lock. No lock is held while
talking to the CA. If the CA no longer knows the account, it is registered again and the
order is retried once.

Every failure leaves as one certd error, mapped in :class:`certd.acme.problems.Failure`: the
CA is not reachable (:class:`CANotReachable`), the CA said no (:class:`AcmeError` with the
problem type), or validation failed (:class:`ChallengeFailed`). Messages are one line ending
with what happens next, and never hold key material.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar

from acme import client as acme_client
from acme import messages
from cryptography import x509

from certd.acme.account import Account, AccountStore
from certd.acme.ari import RenewalInfo, ari_cert_id, askable_cert_id, fetch_renewal_info
from certd.acme import lookup, persist
from certd.acme.order import OrderFlow, signed_post
from certd.acme.problems import Failure, problem_code
from certd.acme.resume import NO_TWINS, Twins
from certd.acme.solvers import solver_for
from certd.acme.transport import AcmeTransport, Network, Transport
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import Clock
from certd.core.errors import AcmeError, CANotReachable, ConfigError, StoreError
from certd.core.model import spki_sha256, split_pem_chain
from certd.crypto.keys import load_private_key, make_csr

__all__ = ["AccountStore", "Issuer", "RenewalInfo", "ari_cert_id", "connect"]

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format

T = TypeVar("T")

ORDER_TIMEOUT = AcmeConfig.order_timeout   # default seconds for one whole order ([acme] order_timeout)


def connect(acme: AcmeConfig, accounts: AccountStore, clock: Clock, *,
            on_request: Callable[[float], None] | None = None, order_timeout: float | None = None) -> Issuer:
    """An :class:`Issuer` for ``[acme]``'s CA over the real HTTP transport (what the daemon and
    the CLI use). ``on_request`` is told the duration (seconds) of every HTTP request to the CA."""
    return Issuer(acme, accounts, clock, AcmeTransport.for_config(acme, clock, on_request=on_request),
                  order_timeout=order_timeout)


class Issuer:
    """Talks to one ACME CA for one account. Thread-safe; see the module docstring."""

    def __init__(self, acme: AcmeConfig, accounts: AccountStore, clock: Clock, transport: Transport, *,
                 order_timeout: float | None = None) -> None:
        self._acme = acme
        self._clock = clock
        self._transport = transport
        self._order_timeout = acme.order_timeout if order_timeout is None else order_timeout
        self._fail = Failure(acme.directory, clock, acme.table)
        self._account = Account(acme, accounts, transport, self._fail)
        self._lock = threading.Lock()          # the directory, fetched once
        self._local = threading.local()
        self._directory: messages.Directory | None = None

    # -- public API --

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None,
              progress: Callable[[str], None] | None = None,
              on_order: Callable[..., None] | None = None,
              before: Callable[[str], None] | None = None) -> bytes:
        """Order, validate, finalize and download a certificate for ``cert.domains``.

        Returns the full chain PEM exactly as the CA sent it (check it with
        :func:`certd.crypto.certcheck.check_issued`). ``replaces`` is the ARI identifier of the
        certificate this one renews (RFC 9773 §5); if the CA refuses it, the order is placed
        again without it. ``on_order(url, profile)`` is told the new order's URL and the profile
        asked for before any challenge is
        answered or the order finalized (journal it there; :meth:`resume` continues it).
        ``before(step)`` is called right before newOrder and before finalize (``"newOrder"``,
        ``"finalize"``); what it raises ends the order there (a fleet's lease check).
        """
        csr_pem = make_csr(key_pem, cert.identifiers)
        chain = self._ordering(cert, progress, lambda flow: flow.run(csr_pem, replaces, on_order), before)
        assert chain is not None  # a new order either ends in a chain or raises
        return chain

    def resume(self, cert: CertificateConfig, order_url: str, key_pem: bytes, *,
               progress: Callable[[str], None] | None = None,
               before: Callable[[str], None] | None = None) -> bytes | None:
        """Continue the order at ``order_url`` (placed by :meth:`issue` for ``cert.domains``,
        ``key_pem`` being the key it was for) without a new order: download it if issued,
        finalize it if ready, prove control if pending. The full chain PEM as :meth:`issue`;
        None when the order cannot be continued (the CA does not know it, it is invalid or
        expired; the reason is logged): order afresh. Failures as :meth:`issue`."""
        csr_pem = make_csr(key_pem, cert.identifiers)
        return self._ordering(cert, progress, lambda flow: flow.resume(order_url, csr_pem), before)

    def find_order(self, cert: CertificateConfig, key_pem: bytes, *, profile: str | None = None,
                   newer_than: datetime | None = None, twins: Twins | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[str | None, str]:
        """(the URL of the order an intent placed for ``cert``'s identifiers (and ``profile``)
        with ``key_pem``, found in the account's orders list (:mod:`certd.acme.lookup`), or None
        when none is surely the intent's; why, for the audit) (no list, nothing or several match, a lookup that fails
        or takes over :data:`certd.acme.lookup.BUDGET`: the reason is logged). ``newer_than``:
        the newest stored version's notBefore; ``twins``: what the other certificates for these
        identifiers hold (:class:`certd.acme.resume.Twins`). Only the CA unreachable raises
        (CANotReachable: the intent is kept)."""
        spki = spki_sha256(load_private_key(key_pem).public_key())

        def body(flow: OrderFlow) -> tuple[str | None, str]:
            url, why = lookup.find(flow.client, cert.identifiers, profile, spki, newer_than, self._clock.now(),
                                   twins=twins or NO_TWINS, monotonic=self._clock.monotonic)
            log.info("order_lookup certificate=%s found=%s reason=%s", cert.name, url or "-", why)
            (progress or (lambda _m: None))(f"order for the journaled intent: {url or 'none'} ({why})")
            return url, why
        return self._ordering(cert, progress, body)

    def _ordering(self, cert: CertificateConfig, progress: Callable[[str], None] | None,
                  body: Callable[[OrderFlow], T],
                  before: Callable[[str], None] | None = None) -> T:
        """Run ``body`` on an :class:`OrderFlow` within the order deadline, every failure
        mapped to one certd error; once more after registering again if the CA forgot the account."""
        say = progress or (lambda _msg: None)
        doing = f"issuing {cert.name}"
        deadline = self._clock.monotonic() + self._order_timeout
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
                        flow = OrderFlow(client, cert, solver, say, deadline=deadline,
                                         order_timeout=self._order_timeout, clock=self._clock, fail=self._fail)
                        if before is not None:
                            flow.before = before
                        return body(flow)
                    except messages.Error as e:
                        if problem_code(e) != "accountDoesNotExist" or attempt == 2:
                            raise
                    finally:
                        net.time_left = None
                    log.warning("account_unknown directory=%s: the CA no longer knows account %s; "
                                "registering again", self._acme.directory, used_account.uri if used_account else "?")
                    # Outside the order: badNonce retries are bounded by count (BAD_NONCE_ATTEMPTS).
                    self._account.reregister(self._get_directory(), used_account, None)
        except CANotReachable as e:
            if self._clock.monotonic() < deadline:
                raise
            raise AcmeError(f"{doing}: no certificate within the {self._order_timeout:g} s order deadline "
                            f"({self._acme.table} order_timeout): the CA at {self._acme.directory} answers too slowly; "
                            "will retry", transient=True) from e
        raise AssertionError("unreachable")

    def renewal_info(self, cert_pem: bytes) -> RenewalInfo | None:
        """The CA's renewal window for ``cert_pem`` (RFC 9773).

        None when the CA has no ``renewalInfo``, the certificate has no authority key
        identifier, or it has expired (RFC 9773 §4.3: clients must not ask then; renew now).
        """
        cert_id = askable_cert_id(cert_pem, self._clock.now())
        if cert_id is None:
            return None
        with self._mapped("fetching renewal information"):
            try:
                base = self._get_directory()["renewalInfo"]
            except KeyError:
                return None
            return fetch_renewal_info(self._network(), f"{str(base).rstrip('/')}/{cert_id}", self._clock)

    def revoke(self, cert_pem: bytes, reason: int) -> None:
        """Revoke ``cert_pem`` (RFC 5280 reason code) with the account key."""
        cert = x509.load_pem_x509_certificate(split_pem_chain(cert_pem)[0])
        with self._mapped(f"revoking certificate {cert.serial_number:x}"):
            client = self._client()
            try:
                signed_post(client, self._get_directory()["revokeCert"],
                            messages.Revocation(certificate=cert, reason=reason))
            except messages.Error as e:
                if problem_code(e) != "alreadyRevoked":
                    raise
                log.info("certificate %x was already revoked", cert.serial_number)

    def persist_records(self, cert: CertificateConfig) -> list[str]:
        """The dns-persist-01 TXT records ``cert`` needs on this CA for this account (registered
        first if it is not yet), as zone-file lines: what ``certd dns-persist-record`` prints."""
        with self._mapped(f"looking up the dns-persist-01 record for {cert.name}"):
            client = self._client()
            meta = getattr(self._get_directory(), "meta", None)
            issuers = list(getattr(meta, "caa_identities", None) or [])
            if not issuers:
                raise AcmeError(f"the CA at {self._acme.directory} lists no caaIdentities in its directory: it names "
                                f"no issuer-domain-name for a dns-persist-01 record; this CA cannot use dns-persist-01")
            account = client.net.account
            assert account is not None  # _client() registered or loaded it
            return persist.record_lines(cert.domains, issuers[0], account.uri)

    def reachable(self) -> bool:
        """True when the CA's directory answers now (the daemon's probe while certificates
        wait out a backoff because the CA was unreachable); never raises."""
        return self._transport.probe()

    def close(self) -> None:
        """Close every HTTP connection this issuer opened (it can still be used afterwards)."""
        self._transport.close()

    # -- directory, account and network --

    @contextmanager
    def _mapped(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (AcmeError, ConfigError, StoreError):  # StoreError: the order journal (on_order)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes one certd error
            raise self._fail(e, doing) from e

    def _network(self) -> Network:
        net: Network | None = getattr(self._local, "net", None)
        if net is None:
            net = self._transport.network()
            self._local.net = net
        return net

    def _get_directory(self) -> messages.Directory:
        directory = self._directory
        if directory is None:
            with self._lock:
                if self._directory is None:
                    self._directory = acme_client.ClientV2.get_directory(
                        self._acme.directory, self._network())  # type: ignore[arg-type]
                directory = self._directory
        return directory

    def _client(self) -> acme_client.ClientV2:
        """This thread's client, signed with the (set up once) account."""
        directory = self._get_directory()
        self._account.ensure(directory, self._network().time_left)
        client: acme_client.ClientV2 | None = getattr(self._local, "client", None)
        if client is None:
            client = acme_client.ClientV2(directory, self._network())  # type: ignore[arg-type]
            self._local.client = client
        self._account.sign(client.net)  # type: ignore[arg-type]
        return client
