"""One ACME order (RFC 8555 §7.4), from newOrder to the downloaded certificate.

Not the ``acme`` library's order flow, because of speed: ``ClientV2.poll_and_finalize`` sleeps
a fixed second between polls, while a local Pebble needs ~15 ms for a whole order.
:class:`OrderFlow` polls the *order* (one request whatever the number of names: its status
turns ``ready`` once every authorization is valid) on a short, growing schedule, honours
``Retry-After`` (capped), and gives up at an overall deadline measured on the injected
:class:`~certd.core.clock.Clock`. Validation failures raise
:class:`~certd.core.errors.ChallengeFailed`, naming domain, challenge and the CA's reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin

import josepy as jose
import requests
from acme import challenges
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509

from certd.acme import resume
from certd.acme.problems import NEXT_STEP, Failure, http_status, one_line, problem_code, problem_detail
from certd.acme.solvers import Solver
from certd.config import CertificateConfig
from certd.core.clock import Clock
from certd.core.errors import AcmeError, ChallengeFailed
from certd.core.model import split_pem_chain
from certd.core.retry import CHALLENGE, FINALIZE, NEW_ORDER
from certd.core.retry_after import retry_after_seconds

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format

# Poll schedule (RFC 8555 §7.5.1, §7.4): the first poll right after the challenge answer or the
# finalize request (a local CA is done in milliseconds; no fixed wait is paid per certificate),
# unless the CA said Retry-After; then waits grow from FIRST_POLL, never shorter than what
# the CA asks (capped).
FIRST_POLL = 0.001        # as the limit client: a local CA answers the next poll in about a millisecond
POLL_GROWTH = 2.0
MAX_POLL = 2.0
MAX_RETRY_AFTER = 15.0       # never wait longer than this for one poll, whatever the CA says

_FINAL_CHALLENGE_PROBLEMS = {"caa", "rejectedIdentifier", "unsupportedIdentifier"}


def choose_profile(cert: CertificateConfig, offered: Mapping[str, str] | None) -> tuple[str | None, str]:
    """The profile to put in newOrder (None: the CA's default) and why, from the directory's
    ``meta.profiles`` (draft-ietf-acme-profiles §3). A required ``profile`` the CA does not
    offer is a held refusal naming what it offers; a ``preferred_profile`` it does not offer
    falls back to the default."""
    names = sorted(offered or {})
    if cert.profile is not None:
        if cert.profile not in names:
            raise AcmeError(f"issuing {cert.name}: the CA offers no profile {cert.profile!r} (it offers "
                            f"{', '.join(names) or 'no profiles at all'}); set profile to one of them, or use "
                            f"preferred_profile to fall back to the CA's default",
                            problem_type="urn:ietf:params:acme:error:invalidProfile", where=NEW_ORDER)
        return cert.profile, "required by the configuration"
    if cert.preferred_profile is not None:
        if cert.preferred_profile in names:
            return cert.preferred_profile, "preferred, and offered by the CA"
        return None, (f"preferred profile {cert.preferred_profile!r} not offered (the CA offers "
                      f"{', '.join(names) or 'none'}); the CA's default")
    return None, "the CA's default"


def challenge_type(challb: messages.ChallengeBody) -> str:
    """The challenge's type, also for one the ``acme`` library does not know (dns-persist-01)."""
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", ""))
    return str(chall.typ)


def topmost_issuer(fullchain: bytes) -> str | None:
    """The issuer common name of the last certificate of a PEM chain (None if it has none)."""
    blocks = split_pem_chain(fullchain)
    if not blocks:
        return None
    try:
        top = x509.load_pem_x509_certificate(blocks[-1])
    except ValueError:
        return None
    names = top.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class ReplacingOrder(messages.NewOrder):
    """newOrder with RFC 9773 §5 ``replaces`` (acme 5.9 has no such field)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def signed_post(client: acme_client.ClientV2, url: str, obj: Any) -> requests.Response:
    return client.net.post(url, obj, new_nonce_url=client.directory["newNonce"])


def post_as_get(client: acme_client.ClientV2, url: str) -> requests.Response:
    """POST-as-GET (RFC 8555 §6.3)."""
    return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])


class OrderFlow:
    """newOrder -> challenges -> poll -> finalize -> poll -> download, for one certificate.

    ``deadline`` (on ``clock``) ends the whole order; ``order_timeout`` is how long that was,
    for messages. ``fail`` maps a problem in the finished order to a certd error.
    """

    def __init__(self, client: acme_client.ClientV2, cert: CertificateConfig, solver: Solver,
                 say: Callable[[str], None], *, deadline: float, order_timeout: float, clock: Clock,
                 fail: Failure) -> None:
        self.client, self.cert, self.solver = client, cert, solver
        self.say, self.deadline, self.order_timeout = say, deadline, order_timeout
        self.clock, self.fail = clock, fail
        self.doing = f"issuing {cert.name}"
        self.profile: str | None = None   # asked for in newOrder (None: the CA's default)
        #: called with "newOrder" / "finalize" right before that request (a fleet proves its
        #: lease there: raising stops the order before the CA acts)
        self.before: Callable[[str], None] = lambda _step: None

    def run(self, csr_pem: bytes, replaces: str | None,
            on_order: Callable[..., None] | None = None) -> bytes:
        """A new order. ``on_order(url, profile)`` is told its URL and the profile asked for
        (None: the CA's default) right after newOrder, before any challenge is answered or the
        order finalized (the renewal journals it there, to resume it)."""
        self.before("newOrder")
        with _where(NEW_ORDER):
            uri, order = self.create(replaces)
        self.say(f"order {uri} created ({order.status.name})"
                 + (f", profile {self.profile}" if self.profile else ""))
        if on_order is not None:
            on_order(uri, self.profile)
        return self.complete(uri, order, csr_pem)

    def resume(self, uri: str, csr_pem: bytes) -> bytes | None:
        """Continue the order at ``uri`` from where the CA has it (:func:`certd.acme.resume.next_step`);
        None, with the reason logged, when it cannot be continued (unknown to the CA, invalid,
        expired): the caller orders afresh."""
        try:
            order = messages.Order.from_json(post_as_get(self.client, uri).json())
        except (messages.Error, acme_errors.ClientError) as e:
            why = _gone(e)
            if why is None:
                raise  # the CA is in trouble, not the order: keep the journal for the next attempt
            self.discarded(uri, why)
            return None
        step, why = resume.next_step(order.status.name, order.expires, self.clock.now())
        if step is resume.Step.DISCARD:
            self.discarded(uri, why)
            return None
        log.info("order_resumed certificate=%s order=%s status=%s", self.cert.name, uri, order.status.name)
        self.say(f"resuming order {uri} ({order.status.name})")
        return self.complete(uri, order, csr_pem)

    def discarded(self, uri: str, why: str) -> None:
        log.warning("order_discarded certificate=%s order=%s reason=%s; ordering afresh", self.cert.name, uri, why)
        self.say(f"not resuming order {uri}: {why}")

    def complete(self, uri: str, order: messages.Order, csr_pem: bytes) -> bytes:
        """From ``order`` as it is now to the downloaded chain: validate, finalize, wait, download."""
        if order.status.name == "pending":
            order = self.validate(uri, order)
        told: float | None = None
        if order.status.name == "ready":
            csr = x509.load_pem_x509_csr(csr_pem)
            self.before("finalize")
            with _where(FINALIZE):
                response = signed_post(self.client, order.finalize, messages.CertificateRequest(csr=csr))
                order = messages.Order.from_json(response.json())
            told = retry_after_seconds(response.headers.get("Retry-After"), self.clock.now())
            self.say("finalizing")
        if order.status.name in ("ready", "processing"):
            # At once, unless the finalize answer said when to ask (RFC 8555 §7.4: "processing"
            # with Retry-After): a fixed guess here was a wait every certificate paid.
            order = self.poll(uri, "the CA to issue the certificate",
                              first_wait=min(told, MAX_RETRY_AFTER) if told is not None else 0.0)
        if order.status.name != "valid" or not order.certificate:
            raise self.order_failed(order)
        response = post_as_get(self.client, order.certificate)
        self.say("certificate downloaded")
        if self.cert.preferred_chain is None:
            return response.content
        return self.preferred(response)

    def preferred(self, response: requests.Response) -> bytes:
        """The chain whose topmost certificate is issued by ``preferred_chain``: the default one
        or an alternate the CA links (RFC 8555 §7.4.2, ``Link: rel="alternate"``); the default,
        with the reason logged, when none matches."""
        want = self.cert.preferred_chain
        seen = [topmost_issuer(response.content)]
        if seen[0] == want:
            return response.content
        links = requests.utils.parse_header_links(response.headers.get("Link", ""))
        for url in [urljoin(response.url, link["url"]) for link in links if link.get("rel") == "alternate"]:
            try:  # the certificate is issued: an alternate that cannot be fetched must not fail it
                alternate = post_as_get(self.client, url).content
            except Exception as e:  # noqa: BLE001 - whatever the CA or the network did, the default chain stands
                log.warning("alternate_chain_unavailable certificate=%s url=%s error=%s", self.cert.name, url,
                            one_line(str(e)))
                continue
            seen.append(topmost_issuer(alternate))
            if seen[-1] == want:
                self.say(f"using the alternate chain to {want!r}")
                return alternate
        log.warning("preferred_chain_unavailable certificate=%s preferred=%r offered=%s; using the default chain",
                    self.cert.name, want, ",".join(repr(s) for s in seen))
        self.say(f"no chain to {want!r} (the CA offers {', '.join(repr(s) for s in seen)}); the default chain")
        return response.content

    def create(self, replaces: str | None) -> tuple[str, messages.Order]:
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in self.cert.domains]
        identifiers += [messages.Identifier(typ=messages.IDENTIFIER_IP, value=ip) for ip in self.cert.ip_addresses]
        url = self.client.directory["newOrder"]
        meta = getattr(self.client.directory, "meta", None)
        self.profile, why = choose_profile(self.cert, getattr(meta, "profiles", None))
        if self.cert.profile is not None or self.cert.preferred_profile is not None:
            log.info("profile_chosen certificate=%s profile=%s reason=%s", self.cert.name, self.profile or "-", why)
        extra = {"profile": self.profile} if self.profile else {}
        if replaces:
            try:
                response = signed_post(self.client, url, ReplacingOrder(identifiers=identifiers, replaces=replaces,
                                                                        **extra))
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
                response = signed_post(self.client, url, messages.NewOrder(identifiers=identifiers, **extra))
        else:
            response = signed_post(self.client, url, messages.NewOrder(identifiers=identifiers, **extra))
        return response.headers["Location"], messages.Order.from_json(response.json())

    def validate(self, uri: str, order: messages.Order) -> messages.Order:
        """Present and answer every pending authorization's challenge, then wait for the order."""
        authzs = [(url, messages.Authorization.from_json(post_as_get(self.client, url).json()))
                  for url in order.authorizations]
        work = []
        for _url, authz in authzs:
            if authz.status.name == "valid":
                continue
            if authz.status.name != "pending":
                raise self.authz_failed(authz)
            challb = next((c for c in authz.challenges if challenge_type(c) == self.solver.challenge_type), None)
            if challb is None:
                offered = ", ".join(sorted({challenge_type(c) for c in authz.challenges})) or "none"
                raise AcmeError(f"{self.doing}: the CA offers no {self.solver.challenge_type} challenge for "
                                f"{_authz_name(authz)} (offers {offered}); choose another challenge")
            work.append((authz.identifier.value, challb))
        if not work:
            return self.poll(uri, "the order to become ready")
        key = self.client.net.key
        assert key is not None  # the client signs with the account key (Issuer._client)
        bind = getattr(self.solver, "bind", None)
        if bind is not None and self.client.net.account is not None:
            bind(self.client.net.account.uri)  # dns-persist-01 names the account in its record
        answer = getattr(self.solver, "response", None)
        presented: list[tuple[str, messages.ChallengeBody]] = []
        try:
            self.present_all(work, key, presented)
            for _domain, challb in work:
                body = answer(challb.chall, key) if answer is not None else challb.chall.response(key)
                signed_post(self.client, challb.uri, body)
            self.say(f"answered {len(work)} {self.solver.challenge_type} challenge(s)")
            order = self.poll(uri, "validation")
        finally:
            self.side_by_side([functools.partial(self.solver.cleanup, d, c.chall, key) for d, c in presented])
        if order.status.name == "invalid":
            for url, _authz in authzs:
                authz = messages.Authorization.from_json(post_as_get(self.client, url).json())
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

        The first poll is sent at once, or after ``first_wait`` (what the CA's previous answer
        asked for). Waits then grow from :data:`FIRST_POLL` by :data:`POLL_GROWTH` up to :data:`MAX_POLL`, but are
        never shorter than two round trips of the last poll: milliseconds against a local CA,
        a polite pace against a distant one. A Retry-After from the CA wins (up to
        :data:`MAX_RETRY_AFTER`).
        """
        delay = FIRST_POLL
        if first_wait > 0:
            self.clock.sleep(min(first_wait, max(0.0, self.deadline - self.clock.monotonic())))
        while True:
            sent = self.clock.monotonic()
            response = post_as_get(self.client, uri)
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
                                f"{self.order_timeout:g} s (order {order.status.name}); will retry",
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
        assert problem is not None  # chosen for having one
        code = problem_code(problem)
        final = code in _FINAL_CHALLENGE_PROBLEMS
        typ = challenge_type(failed)
        hint = (f" (the record `certd dns-persist-record {self.cert.name}` prints must be published)"
                if typ == "dns-persist-01" else "")
        return ChallengeFailed(
            f"{self.doing}: the CA could not validate {typ} for {name} ({code}): "
            f"{problem_detail(problem)}{hint}; "
            f"{NEXT_STEP.get(code, 'fix what the CA names') if final else 'will retry'}",
            problem_type=problem.typ, detail=problem.detail, transient=not final, where=CHALLENGE)

    def order_failed(self, order: messages.Order) -> AcmeError:
        if order.error is not None:
            error = self.fail.problem(order.error, f"{self.doing}: the order is {order.status.name}")
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


def _gone(e: messages.Error | acme_errors.ClientError) -> str | None:
    """Why the CA's answer ``e`` to fetching an order means the order is gone; None if it does not."""
    if isinstance(e, messages.Error):
        code = problem_code(e)
        return f"the CA answered {code}: {one_line(e.detail or '')}" if resume.order_gone(code, None) else None
    status = http_status(e)
    return f"the CA answered HTTP {status}" if resume.order_gone(None, status) else None


def _authz_name(authz: messages.Authorization) -> str:
    value = authz.identifier.value if authz.identifier else "?"
    return f"*.{value}" if authz.wildcard else value
