"""Destroying retired keys once ``destroy_after`` has passed (key classes), with an audit record
that proves which key went.

A version's key is *retired* when no rollback can need it: the version is neither the current
one, nor the newest one older than it, nor the one the last successful rotation replaced (what
``certd rollback`` picks without ``--to``), nor an end of a rotation a crash left unfinished.
Those are never touched. A retired version is first
marked ``retired_at`` (in its meta) by the pass that finds it retired, which runs after every
commit, so the mark is the time it was retired to within a pass; a version that becomes current
or previous again (a rollback ``--to`` it) loses the mark. Once ``now - retired_at`` reaches
``destroy_after``, :meth:`Store.destroy_key` zeroes and removes its key file (with key custody
that file holds the only copy of the wrapped data key: crypto-shredding), its deployed copies
go too, and a ``key_destroyed`` event records the key's SPKI SHA-256, computed from the
certificate, which stays. The version's certificate and meta stay for the record; rollback
refuses it (certd.engine.lifecycle).

With ``reuse_key`` a retired version may share its key with a version that is kept: then only
this version's stored copy is destroyed, the deployed files (which are the kept key's) are left
alone, and the event says which versions still hold the key.

The caller holds the certificate's lock. A failure is logged and audited, never raised: the
rotation that called it has committed, and the next pass tries again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from certd.config import CertificateConfig, Config
from certd.core.clock import isoformat
from certd.core.errors import CertdError
from certd.core.policy import format_duration
from certd.core.rotation import Journal
from certd.engine import keyage
from certd.engine.lifecycle import VersionStatus
from certd.engine.ports import Ports
from certd.ops.log import event
from certd.store.files import VersionInfo

log = logging.getLogger("certd.destruction")

RETIRED_AT = "retired_at"


def kept_for_rollback(ports: Ports, name: str) -> set[int]:
    """The versions whose keys must stay: current, the newest older one, the one the last
    successful rotation replaced, and both ends of a rotation a crash left unfinished."""
    store = ports.store
    current = store.current(name)
    if current is None:
        return set(store.versions(name))  # nothing deployed by certd yet: nothing is retired
    keep = {current}
    older = [v for v in store.versions(name) if v < current]
    if older:
        keep.add(older[-1])
    raw = store.load_journal(name)
    j = Journal.from_json(raw) if raw else None
    if j is not None and j.succeeded and j.to_version == current and j.from_version is not None:
        keep.add(j.from_version)
    if j is not None and not j.finished:  # a crash left it: resuming it needs both ends
        keep |= {v for v in (j.from_version, j.to_version) if v is not None}
    return keep


def destroy_retired_keys(ports: Ports, cert: CertificateConfig, initiator: str = "scheduler") -> list[int]:
    """Mark newly retired versions, destroy the keys retired for ``destroy_after`` or longer;
    the versions whose key was destroyed (see the module)."""
    if cert.destroy_after is None:
        return []
    try:
        keep, due = _retire(ports, cert)
    except CertdError as e:  # the marks are retried by the next pass
        event(log, "key_destroy_failed", logging.ERROR, name=cert.name, error=str(e))
        return []
    store, name = ports.store, cert.name
    destroyed = [vi.version for vi in due if _destroy(ports, cert, vi, initiator)]
    if destroyed:
        try:
            alive = {v for v in store.versions(name) if v in keep or
                     not VersionStatus.from_meta(store.load_info(name, v).meta).key_destroyed}
            ports.edges.prune(cert, alive)  # the destroyed versions' staged copies
        except CertdError as e:
            event(log, "key_destroy_failed", logging.ERROR, name=name, error=str(e))
    return destroyed


def _retire(ports: Ports, cert: CertificateConfig) -> tuple[set[int], list[VersionInfo]]:
    """Mark (and unmark) retired versions; the versions kept, and those due for destruction."""
    assert cert.destroy_after is not None
    store, name, now = ports.store, cert.name, ports.clock.now()
    keep = kept_for_rollback(ports, name)
    due: list[VersionInfo] = []
    for v in store.versions(name):
        vi = store.load_info(name, v)
        if VersionStatus.from_meta(vi.meta).key_destroyed:
            continue
        retired_at = _time(vi.meta.get(RETIRED_AT))
        if v in keep:
            if retired_at is not None:  # in service again (a rollback to it): the clock starts anew
                store.update_meta(name, v, {RETIRED_AT: None})
        elif retired_at is None:
            store.update_meta(name, v, {RETIRED_AT: isoformat(now)})
        elif now - retired_at >= timedelta(seconds=cert.destroy_after):
            due.append(vi)
    return keep, due


def _destroy(ports: Ports, cert: CertificateConfig, vi: VersionInfo, initiator: str) -> bool:
    store, name, spki = ports.store, cert.name, vi.info.spki_sha256
    assert cert.destroy_after is not None
    rule = keyage.class_note(cert, "destroy_after")
    reason = f"destroy_after {format_duration(timedelta(seconds=cert.destroy_after))}{rule}"
    try:
        sharing = [v for v in store.versions(name) if v != vi.version
                   and (o := store.load_info(name, v)).info.spki_sha256 == spki
                   and not VersionStatus.from_meta(o.meta).key_destroyed]
        key_pem = store.load(name, vi.version).bundle.key_pem
        store.destroy_key(name, vi.version)
        files = [] if sharing else ports.edges.destroy_keys(cert, [key_pem])
    except CertdError as e:
        event(log, "key_destroy_failed", logging.ERROR, name=name, version=vi.version, error=str(e))
        ports.emit("key_destroyed", name, initiator=initiator, reason=reason, outcome="failed", spki_sha256=spki,
                   version=vi.version, old_serial=vi.info.serial, detail={"error": str(e)})
        return False
    detail = {"retired_at": vi.meta.get(RETIRED_AT), "deployed_copies": len(files)}
    if sharing:
        detail["key_still_in_versions"] = sharing
    event(log, "key_destroyed", name=name, version=vi.version, spki_sha256=spki, reason=reason)
    ports.emit("key_destroyed", name, initiator=initiator, reason=reason, spki_sha256=spki, version=vi.version,
               old_serial=vi.info.serial, detail=detail)
    return True


def pass_interval(config: Config) -> float:
    """Seconds between the daemon's destruction passes: a quarter of the shortest
    ``destroy_after``, between 1 s and an hour (an hour when no certificate has one)."""
    shortest = min((c.destroy_after for c in config.certificates if c.destroy_after), default=None)
    return 3600.0 if shortest is None else min(max(shortest / 4, 1.0), 3600.0)


def _time(raw: object) -> datetime | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
