"""The renewal's issue step around the order journal: resume an interrupted order, else order
afresh and journal the new order before it is finalized.

Why: a process killed between newOrder and storing the issued certificate (SIGKILL, power,
OOM, a node lost in a fleet) used to leave an order at the CA that nobody would finish; the
next attempt placed a second one, and if the first had been finalized the CA issued twice
for one renewal (the duplicate-certificate limit counts both). Now the order URL and the new
key (0600, like every key; never logged) are stored through the store, under the
certificate's lease, as soon as the order exists; the next attempt — any process that takes
the lease — continues that order (:meth:`certd.acme.issuer.Issuer.resume`), and the journal
is cleared once the certificate is stored as a version, or once the order is known to be over.

The journal is best effort on the way in: if it cannot be written (a full disk), the order
goes on, as before this journal existed; only a lost lease stops it.

The journal is written once before that, right before newOrder and with the lease proof
(:meth:`certd.store.port.Store.prove_with_order`: one statement on PostgreSQL), as an
*intent*: the names, the CA, the profile and the new key, with no order URL
(:attr:`certd.store.port.OrderJournal.intent`). A CA answering newOrder with a problem placed
no order: the intent is cleared at once. A process killed after the CA accepted newOrder
and before the URL was journaled (the fleet soak: 101 orders for 100 renewals) leaves that
intent; the next attempt (this host after a restart, or in a fleet another node once the lease
lapsed: the reconcile pass finds intents as it finds journals) looks the order up in the
account's orders list (:meth:`certd.acme.issuer.Issuer.find_order`), journals its URL and
resumes it like any journaled order — only an order that is surely the intent's: giving the
intent up costs at most one order, a wrong pick a wrong or duplicate certificate. So the lookup
is told the newest stored version's notBefore (a valid order's certificate must be newer) and
what the other certificates for the same identifiers hold (:meth:`_twins`); only the CA
unreachable keeps the intent, for :data:`MAX_LOOKUPS` lookups. A CA without an orders list (Let's
Encrypt), nothing surely its, an answer certd cannot read, a lookup past its budget: the intent
is discarded and a new order placed, audited once (``order_intent``, outcome ``not_found``,
with why). An intent is not written over a journal that still names an order (:meth:`_keeps`:
with several CAs, one a CA that is down could not continue this attempt): that new order goes
without an intent, and its failure does not clear the other order's journal. The
file store writes an intent without any fsync (a SIGKILL keeps the page cache; a power loss in
that window costs at most one order), so a renewal pays no fsync for it.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, replace
from typing import Callable

from certd.acme import resume
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import isoformat
from certd.core.errors import AcmeError, CANotReachable, StoreError, StoreUnreachable
from certd.core.model import spki_sha256
from certd.core.retry import NEW_ORDER
from certd.core.rotation import CRASH_ENV
from certd.crypto import keys
from certd.engine import adopt
from certd.engine.lifecycle import VersionStatus
from certd.engine.ports import Ports, Say
from certd.ops.log import event
from certd.store.port import LeaseLost, OrderJournal

log = logging.getLogger("certd")

#: fault-injection points (``CERTD_CRASH_AT``) for the crash tests
CRASH_ORDERED = "order_created"        # the CA accepted newOrder; its URL is not journaled yet
CRASH_JOURNALED = "order_journaled"    # the journal is stored; no challenge answered, not finalized
CRASH_FINALIZED = "order_finalized"    # the CA issued and certd downloaded; no version stored yet

#: an intent's journal meta: how many lookups found its CA unreachable
META_LOOKUPS = "lookups"
#: lookups of one intent at most; the last one unreachable drops it (ordered afresh)
MAX_LOOKUPS = 3


@dataclass(frozen=True)
class Issued:
    """What the CA issued, and for which key (the journaled one, when the order was resumed)."""

    fullchain: bytes
    key_pem: bytes
    replaces: str | None
    journaled: bool = False    # a journal is stored for it (written now, or resumed from)
    profile: str | None = None  # the ACME profile asked for (None: the CA's default)
    ca: str | None = None       # the name of the CA that issued it


class Orders:
    """The order journal of the certificates this process renews, over ``ports``. Every
    method is called under the certificate's lease (the renewal holds it)."""

    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        #: certificates whose journal holds an order this attempt's new order did not place (kept
        #: by :meth:`_intend`): that order's fate is not judged by the new order's failure
        self._foreign: set[str] = set()

    def order(self, cert: CertificateConfig, ca: AcmeConfig, new_key: Callable[[], bytes], replaces: str | None,
              say: Say) -> Issued:
        """A new order at ``ca`` for ``new_key()`` (journaled before finalize). OperationFailed."""
        key_pem = new_key()
        say(f"ordering from CA {ca.name}" + (f" (replaces {replaces})" if replaces else ""))

        journaled = placed = False
        profile: str | None = None
        proving = self._proving(cert.name)

        def before(step: str) -> None:
            nonlocal journaled
            if step == "newOrder":  # the intent, with the lease proof: the order can be found again
                journaled = self._intend(cert, ca, key_pem, replaces, proving) or journaled
            else:
                proving(step)

        def journal(order_url: str, asked: str | None = None) -> None:
            nonlocal journaled, profile, placed
            placed = True
            crash_at(CRASH_ORDERED)
            profile = asked
            journaled = self._save(cert, ca, order_url, key_pem, replaces, asked) or journaled
            crash_at(CRASH_JOURNALED)

        try:
            fullchain = self.ports.issuer_at(ca.name).issue(cert, key_pem, replaces=replaces, progress=say,
                                                            on_order=journal, before=before)
        except AcmeError as e:
            if journaled and not placed and e.problem_type and e.where == NEW_ORDER:
                self._clear(cert.name)  # the CA answered newOrder with a problem: no order to find
            raise
        crash_at(CRASH_FINALIZED)
        return Issued(fullchain, key_pem, replaces, journaled, profile, ca.name)

    def stored(self, name: str, journaled: bool) -> None:
        """The order's certificate is stored as a version and a rotation journal or release
        points to it: the order is done (no store write when it had no journal)."""
        if journaled:
            self._clear(name)

    def failed(self, name: str, error: Exception) -> None:
        """The attempt failed with ``error``: discard the journal if the order is over (not when
        the journal is another order's, kept by :meth:`_intend`: that one was judged already)."""
        if name not in self._foreign and not resume.order_may_live(error):
            self._clear(name)

    def resumed(self, cert: CertificateConfig, say: Say) -> Issued | None:
        """The certificate of the journaled order, if there is one and its CA (one of ``cert``'s)
        can continue it; else None (a journal that cannot be resumed is discarded). OperationFailed."""
        store = self.ports.store
        self._foreign.discard(cert.name)   # a new attempt: whatever is journaled is judged here
        try:
            journal = store.load_order(cert.name)
        except LeaseLost:
            raise
        except StoreError as e:  # unreadable: it cannot be resumed, and must not block renewals
            event(log, "order_discarded", logging.WARNING, name=cert.name, reason=f"unreadable: {e}")
            self._clear(cert.name)
            return None
        if journal is None:
            return None
        ca = self._journal_ca(cert, journal)
        why = adopt.journal_refusal(cert, self.ports.config.cas_for(cert), journal)
        if why is None:
            why = self._stored_already(cert.name, journal)
        if why is None and self._compromised(cert.name, journal.key_pem):
            why = "its key (reused) was marked compromised since"
        if why is None and journal.intent:
            journal, why = self._found(cert, ca, journal, say)
        if why is None:
            fullchain = self.ports.issuer_at(ca.name).resume(cert, journal.order_url, journal.key_pem, progress=say,
                                                             before=self._proving(cert.name))
            if fullchain is not None:
                crash_at(CRASH_FINALIZED)
                replaces = journal.meta.get(resume.META_REPLACES)
                profile = journal.meta.get("profile")
                return Issued(fullchain, journal.key_pem, replaces if isinstance(replaces, str) else None, True,
                              profile if isinstance(profile, str) else None, ca.name)
            # the issuer logged why the CA cannot continue it
        else:
            order = journal.order_url or "(intent)"
            event(log, "order_discarded", logging.WARNING, name=cert.name, order=order, reason=why)
            say(f"not resuming order {order}: {why}")
        self._clear(cert.name)
        return None

    def _found(self, cert: CertificateConfig, ca: AcmeConfig, intent: OrderJournal,
               say: Say) -> tuple[OrderJournal, str | None]:
        """The journal of the order ``intent`` placed, found in the account's orders list at
        ``ca`` and journaled now (a crash while it is resumed finds it by URL); else why there
        is none (ordered afresh). Recorded once either way (``order_intent``).

        Only the CA unreachable keeps the intent, for :data:`MAX_LOOKUPS` lookups in all (the
        count is journaled with it): an intent must never block renewals, and giving it up
        costs at most one order, while a wrong pick costs a wrong or duplicate certificate."""
        store = self.ports.store
        profile = intent.meta.get("profile")
        infos = [store.load_info(cert.name, v).info for v in store.versions(cert.name)]
        try:
            url, why = self.ports.issuer_at(ca.name).find_order(
                cert, intent.key_pem, profile=profile if isinstance(profile, str) else None,
                newer_than=max((i.not_before for i in infos), default=None), twins=self._twins(cert), progress=say)
        except CANotReachable as e:
            tries = _int(intent.meta.get(META_LOOKUPS)) + 1
            if tries < MAX_LOOKUPS:
                self._count_lookup(cert.name, intent, tries)
                raise
            url, why = None, f"the CA was unreachable for {tries} lookups ({e})"
        except AcmeError as e:  # the account or directory, or the order deadline: nothing to judge by
            url, why = None, f"the lookup failed ({e})"
        else:
            if url is None:
                why = f"no order found for the journaled intent: {why}"
        detail = {"intent_created": intent.created, "ca": ca.name}
        if url is None:
            self.ports.emit("order_intent", cert.name, outcome="not_found", reason=why, detail=detail)
            return intent, why
        self.ports.emit("order_intent", cert.name, outcome="found", reason=f"the order is resumed: {why}",
                        detail={**detail, "order": url})
        found = OrderJournal(url, intent.key_pem, intent.created, intent.meta)
        try:
            store.save_order(cert.name, found)
        except LeaseLost:
            raise
        except StoreError as e:  # the intent stays: a crash now looks the order up again
            event(log, "order_journal_unwritten", logging.WARNING, name=cert.name, order=url, error=str(e))
        return found, None

    def _count_lookup(self, name: str, intent: OrderJournal, tries: int) -> None:
        """Journal that ``tries`` lookups of ``intent`` found the CA unreachable (best effort:
        unwritten, the intent is looked up a few more times)."""
        try:
            self.ports.store.save_order(name, replace(intent, meta={**intent.meta, META_LOOKUPS: tries}))
        except LeaseLost:
            raise
        except StoreError as e:
            event(log, "order_journal_unwritten", logging.WARNING, name=name, order="(intent)", error=str(e))

    def _twins(self, cert: CertificateConfig) -> resume.Twins:
        """What the other certificates for exactly ``cert``'s identifiers hold and ask for (an
        order the intent would match may be theirs): their journals' order URLs, whether one has
        an intent (or an unreadable journal), their profiles. Only a certificate with the same
        identifier set can have placed an order the intent matches: the rest are not read."""
        store = self.ports.store
        names = sorted(cert.identifiers)
        orders: set[str] = set()
        intent = False
        profiles: set[str] = set()
        for other in self.ports.config.certificates:
            if other.name == cert.name or sorted(other.identifiers) != names:
                continue
            profiles.update(p for p in (other.profile, other.preferred_profile) if p is not None)
            try:
                journal = store.load_order(other.name)
            except LeaseLost:
                raise
            except StoreError:
                intent = True   # unknown: as doubtful as an intent
                continue
            if journal is not None:
                if journal.intent:
                    intent = True
                else:
                    orders.add(journal.order_url)
        profiles -= {cert.profile, cert.preferred_profile}
        return resume.Twins(frozenset(orders), intent, frozenset(profiles))

    def _proving(self, name: str) -> Callable[[str], None]:
        """The issuer's ``before`` hook: prove the certificate's lease right before newOrder and
        finalize (S1: a node that lost it to another must not make the CA act; fencing guards
        only the store's writes)."""
        def before(step: str) -> None:
            try:
                self.ports.store.check_lock(name)
            except LeaseLost as e:
                event(log, "order_stopped", logging.ERROR, name=name, step=step, error=str(e))
                raise
        return before

    def _stored_already(self, name: str, journal: OrderJournal) -> str | None:
        """Why ``journal`` is done, if the newest stored version has its key and was stored
        after it was written: its certificate is that version. The journal is cleared once a
        rotation journal or release points to that version (a version nothing points to yet is
        rolled out before this is asked: :func:`certd.engine.adopt.orphan`), but without an
        fsync of its own, so a power loss can bring a done journal back, or a database stopping
        can keep one; resuming it would store the same certificate again."""
        store = self.ports.store
        versions = store.versions(name)
        if not versions:
            return None
        newest = store.load_info(name, versions[-1])
        if adopt.stored_from(journal, newest):  # an unreadable key is judged by _compromised
            return f"its certificate is stored already (version {newest.version})"
        return None

    def journal_ca(self, cert: CertificateConfig) -> str | None:
        """The name of the CA ``cert``'s journaled order would be resumed at (None: no journal)."""
        try:
            journal = self.ports.store.load_order(cert.name)
        except StoreError:
            return None
        return self._journal_ca(cert, journal).name if journal is not None else None

    def _journal_ca(self, cert: CertificateConfig, journal: OrderJournal) -> AcmeConfig:
        """The order belongs to the CA it was placed with: resumed there, if that is still one of
        ``cert``'s (else the first, where :func:`certd.acme.resume.journal_mismatch` discards it)."""
        cas = self.ports.config.cas_for(cert)
        return next((c for c in cas if c.directory == journal.meta.get(resume.META_DIRECTORY)), cas[0])

    def _compromised(self, name: str, key_pem: bytes) -> bool:
        """Whether ``key_pem`` is the key of a stored version marked compromised: with
        ``reuse_key`` the journaled key is the stored one, and a revocation for keyCompromise
        between the crash and this attempt must not see it certified again."""
        store = self.ports.store
        try:
            spki = spki_sha256(keys.load_private_key(key_pem).public_key())
        except ValueError:
            return True  # unreadable: never certify it
        return any(VersionStatus.from_meta(v.meta).key_compromised and v.info.spki_sha256 == spki
                   for v in (store.load_info(name, n) for n in store.versions(name)))

    def _intend(self, cert: CertificateConfig, ca: AcmeConfig, key_pem: bytes, replaces: str | None,
                proving: Callable[[str], None]) -> bool:
        """Prove the lease and journal the order intent (no URL yet) in one store write, right
        before newOrder; the intent is best effort (False, logged, and the proof made alone),
        the proof is not (LeaseLost stops the order, as ``proving`` does). A journal that may
        still name a live order (:meth:`_keeps`) is not overwritten: the order goes on without
        an intent (a crash before its URL is journaled costs one order, not that order)."""
        kept = self._keeps(cert.name, ca)
        if kept is None:
            self._foreign.discard(cert.name)
            intent = self._journal(cert, ca, "", key_pem, replaces, cert.profile)
            try:
                self.ports.store.prove_with_order(cert.name, intent)
                return True
            except LeaseLost as e:
                event(log, "order_stopped", logging.ERROR, name=cert.name, step="newOrder", error=str(e))
                raise
            except StoreUnreachable:
                raise  # the proof cannot be made either: the order stops here, as it always did
            except StoreError as e:
                event(log, "order_journal_unwritten", logging.WARNING, name=cert.name, order="(intent)",
                      error=str(e))
        else:
            self._foreign.add(cert.name)
            event(log, "order_intent_unwritten", logging.INFO, name=cert.name, ca=ca.name, reason=kept)
        proving("newOrder")
        return False

    def _keeps(self, name: str, ca: AcmeConfig) -> str | None:
        """Why the journal must not be overwritten by an intent for ``ca`` (None: it may): it
        holds an order URL not known to be over (a CA the failover gave up on for this attempt
        may still finish it), or another CA's intent. This renewal's own intent at ``ca`` may be
        replaced (a newOrder asked again). Unreadable: nothing to keep (resumed discarded it)."""
        try:
            journal = self.ports.store.load_order(name)
        except (LeaseLost, StoreUnreachable):
            raise
        except StoreError:
            return None
        if journal is None:
            return None
        if not journal.intent:
            return f"the journal holds order {journal.order_url}, which may still complete"
        if journal.meta.get(resume.META_DIRECTORY) != ca.directory:
            return f"the journal holds an order intent at {journal.meta.get(resume.META_DIRECTORY)}"
        return None

    def _journal(self, cert: CertificateConfig, ca: AcmeConfig, order_url: str, key_pem: bytes, replaces: str | None,
                 profile: str | None) -> OrderJournal:
        meta = resume.journal_meta(ca.directory, cert.identifiers, replaces, cert.key_type)
        if profile is not None:
            meta["profile"] = profile
        return OrderJournal(order_url, key_pem, isoformat(self.ports.clock.now()), meta)

    def _save(self, cert: CertificateConfig, ca: AcmeConfig, order_url: str, key_pem: bytes, replaces: str | None,
              profile: str | None = None) -> bool:
        """Store the journal; False (logged) when the store could not (best effort)."""
        journal = self._journal(cert, ca, order_url, key_pem, replaces, profile)
        try:
            self.ports.store.save_order(cert.name, journal)
            self._foreign.discard(cert.name)   # the journal is this order's now
            return True
        except LeaseLost:
            raise  # another process owns the certificate now: stop before finalizing
        except StoreError as e:
            event(log, "order_journal_unwritten", logging.WARNING, name=cert.name, order=order_url, error=str(e))
            return False

    def _clear(self, name: str) -> None:
        try:
            self.ports.store.save_order(name, None)
        except LeaseLost:
            raise
        except StoreError as e:  # left behind, it is judged (and discarded) by the next attempt
            event(log, "order_journal_not_cleared", logging.WARNING, name=name, error=str(e))


def crash_at(point: str) -> None:
    """Fault injection for the crash tests: ``CERTD_CRASH_AT=<point>`` makes the process
    SIGKILL itself here (as :func:`certd.core.rotation.crash_point` does for rotation steps)."""
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _int(value: object) -> int:
    """A journal meta count (anything else, from an older or damaged journal: 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
