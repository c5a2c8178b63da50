"""Destroying a compromised key once nothing serves it any more (see :mod:`certd.engine.revoke`).

Run after every commit, so a re-key whose first renewal failed is finished by the next
successful one. The deploy targets' copies go first, then the store's.
"""

from __future__ import annotations

import logging

from certd.config import CertificateConfig
from certd.core.errors import CertdError
from certd.engine.lifecycle import KEY_COMPROMISE, VersionStatus
from certd.engine.ports import Ports
from certd.ops.log import event
from certd.store.files import StoredVersion

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
    for spki, svs in by_key.items():
        latest = svs[-1]
        ports.emit("key_destroyed", name, initiator=initiator, reason=KEY_COMPROMISE, spki_sha256=spki,
                   old_serial=latest.bundle.info.serial, version=latest.version,
                   detail={"versions": [sv.version for sv in svs], "deployed_copies": len(files)})
    return [sv.version for sv in pending]


def key_destroyed(ports: Ports, name: str, version: int) -> bool:
    """Whether ``version``'s key is gone (destroyed, or pruned with its version)."""
    if version not in ports.store.versions(name):
        return True  # pruned: its key was zeroed with it
    return VersionStatus.from_meta(ports.store.load(name, version).meta).key_destroyed
