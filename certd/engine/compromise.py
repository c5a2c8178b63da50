"""Destroying a compromised key once nothing serves it any more (see :mod:`certd.engine.revoke`).

:func:`destroy_compromised_keys` runs after every commit, so a re-key whose first renewal failed
is finished by the next successful one. The deploy targets' copies go first (matched by the
key's bytes), then the store's.

**In a fleet** the other nodes hold copies too (their live files' ``.certd-prev``, staged
versions), and the store's copy is gone by the time they look. So each node, once it serves a
version with another key (applied and verified by its reconcile loop, certd/daemon/fleet.py),
destroys its own copies of every compromised key of the certificate by the key's SPKI SHA-256
(:func:`destroy_on_node`: the deploy layer parses each private key file it finds,
:class:`certd.deploy.files.KeyMatch`) and records that per node (``certd_key_destructions``;
the node that re-keyed records it here, after its byte-matched destruction). The revocation is
complete when every node (not removed, live or not) that ever applied the certificate has recorded it and no stored
version keeps a sealed copy (:func:`fleet_completion`): the first node to see that (on its
reconcile pass, or the waiting ``certd revoke``) records the completion and its
``key_compromise_complete`` audit record in one transaction, exactly once
(:mod:`certd.store.pgcompromise`). On a single host none of this applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from certd.config import CertificateConfig
from certd.core.errors import CertdError
from certd.core.events import LifecycleEvent
from certd.engine.lifecycle import KEY_COMPROMISE, VersionStatus
from certd.engine.ports import Ports
from certd.ops.log import event
from certd.store.files import StoredVersion
from certd.store.port import Compromise

log = logging.getLogger("certd.revocation")


def destroy_compromised_keys(ports: Ports, cert: CertificateConfig, initiator: str = "certd") -> list[int]:
    """Zero and remove every copy of a compromised key that the live version no longer uses.
    The caller holds the certificate's lock. Returns the store versions whose key was destroyed;
    a failure is logged and audited, never raised (the renewal that called it has committed)."""
    name, store = cert.name, ports.store
    current = store.current(name)
    live_spki = store.load(name, current).bundle.info.spki_sha256 if current is not None else None
    pending = [sv for sv in (store.load(name, v) for v in store.versions(name))
               if VersionStatus.from_meta(sv.meta).key_to_destroy and sv.bundle.info.spki_sha256 != live_spki]
    if not pending:
        return []
    try:
        files = ports.edges.destroy_keys(cert, {sv.bundle.key_pem for sv in pending})
        for sv in pending:
            store.destroy_key(name, sv.version)
    except CertdError as e:  # the commit stands; the next one tries again
        event(log, "key_destroy_failed", logging.ERROR, name=name, error=str(e))
        ports.emit("key_destroyed", name, initiator=initiator, reason=KEY_COMPROMISE, outcome="failed",
                   spki_sha256=pending[-1].bundle.info.spki_sha256, detail={"error": str(e)})
        return []
    by_key: dict[str, list[StoredVersion]] = {}
    for sv in pending:
        by_key.setdefault(sv.bundle.info.spki_sha256, []).append(sv)
    fleet = book(ports)
    for spki, svs in by_key.items():
        latest = svs[-1]
        detail: dict[str, object] = {"versions": [sv.version for sv in svs], "deployed_copies": len(files)}
        if fleet is not None:
            detail["node"] = fleet.node
            _record(ports, fleet, name, spki, len(files))
        ports.emit("key_destroyed", name, initiator=initiator, reason=KEY_COMPROMISE, spki_sha256=spki,
                   old_serial=latest.bundle.info.serial, version=latest.version, detail=detail)
    return [sv.version for sv in pending]


def key_destroyed(ports: Ports, name: str, version: int) -> bool:
    """Whether ``version``'s key is gone (destroyed, or pruned with its version)."""
    if version not in ports.store.versions(name):
        return True  # pruned: its key was zeroed with it
    return VersionStatus.from_meta(ports.store.load(name, version).meta).key_destroyed


# -- in a fleet ------------------------------------------------------------------------------

class CompromiseStore(Protocol):
    """What a fleet's store offers (:class:`certd.store.pgcompromise.CompromiseBook`)."""

    @property
    def node(self) -> str: ...
    def pending(self, names: Sequence[str]) -> dict[str, set[str]]: ...
    def destroyed(self, name: str, spki: str, files: int) -> None: ...
    def unfinished(self, names: Sequence[str]) -> list[tuple[str, str]]: ...
    def complete(self, name: str, spki: str, within: float,
                 event: Callable[[Compromise], LifecycleEvent]) -> tuple[Compromise, bool]: ...


def book(ports: Ports) -> CompromiseStore | None:
    """The fleet's record of compromised keys, or None on a single host."""
    found: CompromiseStore | None = getattr(ports.store, "compromises", None)
    return found


def _record(ports: Ports, fleet: CompromiseStore, name: str, spki: str, files: int) -> None:
    """Record this node's destruction; a failure is logged (the next pass records it again:
    :func:`destroy_on_node` finds nothing left and records that)."""
    try:
        fleet.destroyed(name, spki, files)
    except CertdError as e:
        event(log, "key_destruction_not_recorded", logging.WARNING, name=name, spki_sha256=spki, error=str(e))


def destroy_on_node(ports: Ports, cert: CertificateConfig, applied: int, spkis: Sequence[str]) -> list[str]:
    """This fleet node serves ``applied`` (deployed and verified): zero and remove its deploy
    targets' copies of each compromised key in ``spkis`` but the applied version's (matched by
    SPKI: the store's copy may be gone), and record each per node. The caller holds this
    process's mutex of the certificate. Returns the SPKI hashes recorded; a failure is logged
    and audited, and tried again at the next pass."""
    fleet = book(ports)
    if fleet is None:
        return []
    name = cert.name
    live = ports.store.load_info(name, applied).info.spki_sha256
    done = []
    for spki in sorted(set(spkis) - {live}):
        try:
            files = ports.edges.destroy_keys(cert, (), spkis=[spki])
        except CertdError as e:
            event(log, "key_destroy_failed", logging.ERROR, name=name, node=fleet.node, error=str(e))
            ports.emit("key_destroyed", name, initiator=f"node={fleet.node}", reason=KEY_COMPROMISE, outcome="failed",
                       spki_sha256=spki, detail={"node": fleet.node, "error": str(e)})
            continue
        fleet.destroyed(name, spki, len(files))
        event(log, "key_destroyed", name=name, node=fleet.node, spki_sha256=spki, files=len(files))
        ports.emit("key_destroyed", name, initiator=f"node={fleet.node}", reason=KEY_COMPROMISE, spki_sha256=spki,
                   version=applied, detail={"node": fleet.node, "deployed_copies": len(files), "serving": applied})
        done.append(spki)
    return done


def fleet_completion(ports: Ports, name: str, spki: str, within: float) -> tuple[Compromise, bool]:
    """Where ``spki``'s key of ``name`` stands in the fleet, the completion recorded (with its
    audit record) if it is gone everywhere now; True when this call recorded it. Only with a
    fleet's store (:func:`book` is not None)."""
    fleet = book(ports)
    assert fleet is not None

    def audit(c: Compromise) -> LifecycleEvent:
        return LifecycleEvent("key_compromise_complete", name, ports.clock.now(), initiator=f"node={fleet.node}",
                              reason=KEY_COMPROMISE, spki_sha256=spki,
                              detail={"node": fleet.node, "nodes": list(c.nodes)})
    c, recorded = fleet.complete(name, spki, within, audit)
    if recorded:
        event(log, "key_compromise_complete", logging.WARNING, name=name, spki_sha256=spki, node=fleet.node,
              nodes=",".join(c.nodes))
    return c, recorded
