"""Adopting the version a fleet node stored and did not roll out (S1: one certificate per renewal).

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
stopped under it), and rolling it out here is what records the renewal (``renewed``).

The gap this does not close: a node that dies after storing the version and before writing
its rotation's first journal step (microseconds) leaves a version nothing points to; the next
node orders again. On one host :meth:`~certd.store.port.Store.foreign_rotations` is empty and
nothing here runs.
"""

from __future__ import annotations

import logging

from certd.config import CertificateConfig
from certd.core.clock import isoformat
from certd.core.rotation import Journal, Step
from certd.core.errors import StoreError
from certd.engine.lifecycle import VersionStatus
from certd.engine.ports import Ports
from certd.ops.log import event

log = logging.getLogger("certd")

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
    status, info = VersionStatus.from_meta(stored.meta), stored.info
    if status.revoked is not None or status.key_compromised or status.key_destroyed:
        return f"version {j.to_version} was revoked or its key retired"
    if info.not_after <= ports.clock.now():
        return f"version {j.to_version} expired at {isoformat(info.not_after)}"
    if sorted(info.identifiers) != sorted(cert.identifiers) or info.key_type != cert.key_type:
        return f"version {j.to_version} no longer matches the configuration (names or key type)"
    return None


def _drop(ports: Ports, node: str, name: str, why: str) -> None:
    event(log, "rotation_dropped", logging.WARNING, name=name, node=node, reason=why)
    ports.store.drop_rotation(node, name)


def take_over(ports: Ports, node: str, j: Journal) -> None:
    """Drop ``node``'s journal of ``j`` (this node rolls its version out now) and audit that."""
    ports.store.drop_rotation(node, j.name)
    event(log, "version_adopted", logging.WARNING, name=j.name, version=j.to_version, node=node, step=j.step.value)
    ports.emit("version_adopted", j.name, initiator=j.initiator, reason=j.reason, version=j.to_version,
               detail={"stored_by": node, "left_at": j.step.value, "from_version": j.from_version})
