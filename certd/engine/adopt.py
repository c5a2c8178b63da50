"""Adopting a version a renewal stored and did not roll out, instead of ordering again (S1: one
certificate per renewal): a fleet node's lapsed rotation, or an orphan nothing points to.

A node that dies, or is cut off, after storing a renewal's version and before its rotation
commits leaves that rotation's journal in the store under its own name, and the certificate's
lease lapses. The next node to hold the lease finds the certificate due, as the dead node did;
ordering again would issue a second certificate for one renewal. So a renewal first looks for
such a version and, when it is still good for the configuration, rolls it out itself: a
rotation of its own from the desired version, audited as ``version_adopted`` with the node
that stored it. The dead node's journal and its ``applied`` row are dropped in one fenced
write, so when it comes back it finds nothing to resume, and its reconciler re-applies the
desired version whatever the rotation had left on its disk.

A journal that cannot be adopted — its rotation had failed, its version is gone, revoked,
expired or no longer matches the configuration, or the desired version moved on since it
started — is dropped the same way, and the renewal orders as usual. One whose own version is
desired already is adopted: its commit reached the store and the reply was lost (the database
stopped under it), and rolling it out here is what records the renewal (``renewed``). On one
host :meth:`~certd.store.port.Store.foreign_rotations` is empty and :func:`lapsed` finds nothing.

Stored, not yet journaled: an *orphan*. A renewal that dies (or whose database stops) after
storing the version and before its rotation's first journal step or its release leaves a
version nothing points to; the next attempt ordered again (the fleet soak: the CA answered
``alreadyReplaced`` to ``replaces``, and the order went out without it: two orders, one
renewal). The order journal closes that window: the renewal clears it only once the rotation
journal or the release exists (certd/engine/renew.py), so while a version is an orphan the
journal that ordered it is still stored, and its key is that version's key. :func:`orphan`
finds it — one store call (``load_order``) when nothing is journaled, which is every renewal
attempt but these — and the renewal rolls the version out as itself (``version_adopted``,
``left_at = "stored"``; then ``renewed``) instead of ordering; on one host too (a SIGKILL).
Not an orphan (its journal is done, and cleared at once: the order step would discard it too,
its certificate being stored, but only when an attempt orders): a version not newer than the
desired one, one a rotation journal (this node's or another's) or the certificate's release
names (rolled out, or rolled back from, already), and one :func:`version_refusal` refuses
(revoked, compromised, destroyed, marked bad, expired, other names or key type, a CA no longer
configured for the certificate or a profile it no longer requires), or whose order
:func:`journal_refusal` refuses as the order step would (another CA directory, names, key type
or profile: the operator moved the certificate from a staging CA to production after the first
issuance died). A keyCompromise renewal never takes an orphan: its key must be made now
(``RenewRequest.fresh_key``). Why not the version and the rotation journal in one transaction
instead: the file store cannot write two files atomically, and the release path would need a
third combined write; the order journal is written before the version on every store
already. What is left: an order whose journal could not be written (best effort, a full
disk) has nothing to find it by, and its renewal orders again, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from certd.acme import resume
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import isoformat
from certd.core.model import spki_sha256
from certd.core.rotation import Journal, Step
from certd.core.errors import StoreError
from certd.crypto import keys
from certd.engine import releases
from certd.engine.lifecycle import VersionStatus
from certd.engine.ports import Ports
from certd.ops.log import event
from certd.store.port import LeaseLost, OrderJournal, VersionInfo

log = logging.getLogger("certd")

#: ``version_adopted``'s ``left_at`` for an orphan: stored, no rotation journal or release yet
LEFT_STORED = "stored"

#: the steps of a rotation still on its way forward (nothing failed yet)
_FORWARD = frozenset({Step.ISSUED, Step.STAGED, Step.SWITCHED, Step.RELOADED, Step.VERIFIED})


def lapsed(ports: Ports, cert: CertificateConfig, current: int | None) -> tuple[str, Journal] | None:
    """The unfinished renewal another node left for ``cert`` that can be rolled out instead of
    ordering again, as (node, journal); the caller holds the certificate's lease (the node that
    wrote it cannot be running it). Other nodes' unfinished rotations that cannot be adopted are
    dropped on the way."""
    store = ports.store
    for node, raw in sorted(store.foreign_rotations(cert.name).items()):
        try:
            j = Journal.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            _drop(ports, node, cert.name, f"its journal is unreadable: {e}")
            continue
        if j.finished:
            continue
        why = _unusable(ports, cert, current, j)
        if why is None:
            return node, j
        _drop(ports, node, cert.name, why)
    return None


def _unusable(ports: Ports, cert: CertificateConfig, current: int | None, j: Journal) -> str | None:
    """Why the version of ``j`` must not be rolled out now, or None."""
    if j.kind != "renew" or j.step not in _FORWARD:
        return f"its {j.kind} had reached {j.step.value}"
    if current not in (j.from_version, j.to_version):
        # to_version desired already: its commit reached the store and its reply did not (the
        # database stopped under it), so the renewal happened and was never recorded; rolling
        # it out here records it (the fleet soak saw such journals dropped as stale)
        return f"it started from version {j.from_version}; version {current} is desired now"
    try:
        stored = ports.store.load_info(cert.name, j.to_version)
    except StoreError as e:
        return f"version {j.to_version} cannot be read: {e}"
    return version_refusal(cert, ports.config.cas_for(cert), stored, ports.clock.now())


def version_refusal(cert: CertificateConfig, cas: Collection[AcmeConfig], stored: VersionInfo,
                    now: datetime) -> str | None:
    """Why ``stored`` must not be rolled out for ``cert`` (ordered from ``cas``) at ``now`` by a
    renewal that did not order it (a lapsed rotation's, an orphan): S3's "deployable" predicate
    (revoked, key compromised or destroyed, marked bad by a release), expired, other names or key
    type than the configuration's, or issued by a CA or for a profile the configuration no longer
    asks for (the operator moved the certificate from a staging CA to production: the staging
    certificate must not be rolled out as its renewal); None if it may. Pure."""
    refusal = VersionStatus.from_meta(stored.meta).deploy_refusal(cert.name, stored.version)
    if refusal is not None:
        return refusal
    info = stored.info
    if info.not_after <= now:
        return f"version {stored.version} expired at {isoformat(info.not_after)}"
    if sorted(info.identifiers) != sorted(cert.identifiers) or info.key_type != cert.key_type:
        return f"version {stored.version} no longer matches the configuration (names or key type)"
    issuer = _foreign_ca(stored.meta, cas)
    if issuer is not None:
        return f"version {stored.version} was issued by {issuer}, a CA no longer configured for {cert.name}"
    profile = stored.meta.get("profile")
    if cert.profile is not None and profile != cert.profile:
        return f"version {stored.version} has profile {profile!r}; the configuration now requires {cert.profile!r}"
    return None


def _foreign_ca(meta: Mapping[str, Any], cas: Collection[AcmeConfig]) -> str | None:
    """The CA a version with ``meta`` records (its directory URL, else its name) when it is none
    of ``cas``; None when it is one, or records none (a version from before several CAs: judged
    on its order journal, :func:`journal_refusal`). The directory decides when recorded: a table
    kept under its name and pointed at another CA is another CA."""
    directory, name = meta.get("ca_directory"), meta.get("ca")
    if isinstance(directory, str):
        known = {ca.directory.rstrip("/") for ca in cas}
        return None if directory.rstrip("/") in known else directory
    if isinstance(name, str):
        return None if name in {ca.name for ca in cas} else f"CA {name!r}"
    return None


def journal_refusal(cert: CertificateConfig, cas: Sequence[AcmeConfig], journal: OrderJournal) -> str | None:
    """Why the order ``journal`` describes is not one ``cert`` would place now, as the order step
    judges it before resuming (:meth:`certd.engine.orders.Orders.resumed`): another CA than the
    certificate's (``cas``), other names or key type, or not the profile it requires; None if
    it is. Pure."""
    if not cas:
        return f"no CA is configured for {cert.name}"
    placed = journal.meta.get(resume.META_DIRECTORY)
    ca = next((c for c in cas if c.directory == placed), cas[0])
    why = resume.journal_mismatch(journal.meta, ca.directory, cert.identifiers, cert.key_type)
    profile = journal.meta.get("profile")
    if why is None and cert.profile is not None and profile != cert.profile:
        why = f"it was ordered with profile {profile!r}; the configuration now requires {cert.profile!r}"
    return why


def stored_from(journal: OrderJournal, stored: VersionInfo) -> bool:
    """Whether ``stored`` holds the certificate of the order ``journal`` describes: it has the
    journaled key and was stored after the journal was written (with ``reuse_key`` older
    versions share the key). Pure."""
    try:
        spki = spki_sha256(keys.load_private_key(journal.key_pem).public_key())
    except ValueError:
        return False
    created = stored.meta.get("created")
    return stored.info.spki_sha256 == spki and isinstance(created, str) and created >= journal.created


def orphan_refusal(cert: CertificateConfig, cas: Sequence[AcmeConfig], journal: OrderJournal, current: int | None,
                   stored: VersionInfo, pointed: Collection[int], now: datetime) -> str | None:
    """Why ``stored``, the certificate of the order ``journal`` describes, is not an orphan to
    roll out as this renewal of ``cert`` (ordered from ``cas``; ``current``: the desired version;
    ``pointed``: the versions a rotation journal or the release names), or None if it is. A
    version rolled out or rolled back from had a rotation journal; one that never went further
    than the store had none. Pure."""
    if current is not None and stored.version <= current:
        return f"version {stored.version} is not newer than version {current}, the desired one"
    if stored.version in pointed:
        return f"a rotation or release took version {stored.version} already"
    refusal = version_refusal(cert, cas, stored, now)
    if refusal is not None:
        return refusal
    why = journal_refusal(cert, cas, journal)
    return f"its order is not the configuration's: {why}" if why is not None else None


def orphan(ports: Ports, cert: CertificateConfig, current: int | None) -> VersionInfo | None:
    """The version a renewal of ``cert`` stored and died before rolling out (an orphan: see
    above), to be rolled out instead of ordering again; None (nothing ordered and stored, or
    not an orphan). The caller holds the lease. One store call when no order is journaled.

    A journal whose certificate is stored and is not an orphan is done (the order step would
    discard it too): it is cleared here, at once, not left for an attempt that orders. Left, a
    stale journal (its clearing failed) of the version rolled out would make that version an
    orphan again once two rollbacks leave no rotation journal naming it."""
    store = ports.store
    try:
        journal = store.load_order(cert.name)
    except LeaseLost:
        raise
    except StoreError:
        return None  # unreadable: the order step discards it
    if journal is None:
        return None
    versions = store.versions(cert.name)
    newest = store.load_info(cert.name, versions[-1]) if versions else None
    if newest is None or not stored_from(journal, newest):
        return None  # the order has not issued, or its certificate was not stored
    why = orphan_refusal(cert, ports.config.cas_for(cert), journal, current, newest, _pointed(ports, cert.name),
                         ports.clock.now())
    if why is not None:
        event(log, "orphan_not_adopted", name=cert.name, version=newest.version, reason=why)
        _clear_order(ports, cert.name)
        return None
    return newest


def _clear_order(ports: Ports, name: str) -> None:
    """Clear ``name``'s order journal; one that cannot be cleared is judged again next attempt."""
    try:
        ports.store.save_order(name, None)
    except LeaseLost:
        raise
    except StoreError as e:
        event(log, "order_journal_not_cleared", logging.WARNING, name=name, error=str(e))


def _pointed(ports: Ports, name: str) -> set[int]:
    """The versions of ``name`` a rotation journal (this node's, another node's) or its release names."""
    store = ports.store
    journals = [store.load_journal(name), *store.foreign_rotations(name).values()]
    found = {v for j in journals if j for v in (j.get("from_version"), j.get("to_version")) if isinstance(v, int)}
    book = releases.book(ports)
    release = book.get(name) if book is not None else None
    return found | ({release.version} if release is not None else set())


def _drop(ports: Ports, node: str, name: str, why: str) -> None:
    event(log, "rotation_dropped", logging.WARNING, name=name, node=node, reason=why)
    ports.store.drop_rotation(node, name)


def adopt_orphan(ports: Ports, cert: CertificateConfig, current: int | None, stored: VersionInfo) -> tuple[str, str]:
    """Audit that this renewal rolls out the orphan ``stored`` (``version_adopted``, left at
    ``stored``); the initiator and reason of the renewal that ordered it, for its rotation."""
    initiator, reason = str(stored.meta.get("initiator") or "scheduler"), str(stored.meta.get("reason") or "")
    event(log, "version_adopted", logging.WARNING, name=cert.name, version=stored.version, step=LEFT_STORED)
    ports.emit("version_adopted", cert.name, initiator=initiator, reason=reason, version=stored.version,
               new_serial=stored.info.serial,
               detail={"left_at": LEFT_STORED, "from_version": current, "stored": stored.meta.get("created")})
    return initiator, reason


def take_over(ports: Ports, node: str, j: Journal) -> None:
    """Drop ``node``'s journal of ``j`` (this node rolls its version out now) and audit that."""
    ports.store.drop_rotation(node, j.name)
    event(log, "version_adopted", logging.WARNING, name=j.name, version=j.to_version, node=node, step=j.step.value)
    ports.emit("version_adopted", j.name, initiator=j.initiator, reason=j.reason, version=j.to_version,
               detail={"stored_by": node, "left_at": j.step.value, "from_version": j.from_version})
