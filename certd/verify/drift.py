"""Drift: do the configuration, the store, the deployed files and the servers still agree?

Four layers are compared for each configured certificate; every mismatch is one
:class:`Mismatch` whose message is one line starting with the certificate's name:

- ``config``: the store's current certificate has the configured names and key type.
- ``store``: the current version can be read.
- ``deployed``: :func:`certd.deploy.stage.check` — live_dir points at the current version; every
  deployed file has the stored content (hash), owner and mode.
- ``served``: one handshake per ``[[certificate.verify]]`` endpoint (:func:`certd.verify.handshake.probe`)
  — it serves the current leaf, with a chain and name that validate.

Not drift: a certificate not issued yet (``status`` says ``missing`` and the scheduler issues
it), a rotation in progress (its own verify step decides; reported as a note), and a
certificate left in the store after it was removed from the configuration (listed, not counted:
certd no longer manages it).

``deployed`` and ``served`` drift is *repairable*: redeploying the current version
(:meth:`certd.engine.manager.Manager.redeploy`) fixes it. ``config`` drift is the renewal policy's
business: a changed domain list or key type makes the certificate due at once.

Pure apart from reading the store and the deployed files and the handshakes; it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from certd.deploy import stage as deploy
from certd.verify import handshake as verify
from certd.config import CertificateConfig, Config
from certd.core.concurrency import bounded_map
from certd.core.errors import CertdError, StoreUnreachable
from certd.core.rotation import Journal
from certd.store.files import Store

KINDS = ("config", "store", "deployed", "served")
REPAIRABLE = frozenset({"deployed", "served"})
#: One handshake's bound during a drift check (a black-holed endpoint must not stall the rest).
PROBE_TIMEOUT = 3.0
#: Certificates checked side by side by :func:`check_all`.
WORKERS = 8


@dataclass(frozen=True)
class Mismatch:
    kind: str      # one of KINDS
    subject: str   # the path, endpoint or configuration key concerned
    message: str   # one line, starting with "<name>: "

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "message": self.message}


@dataclass(frozen=True)
class CertDrift:
    """The outcome of checking one certificate."""

    name: str
    version: int | None = None
    serial: str | None = None
    mismatches: tuple[Mismatch, ...] = ()
    note: str | None = None          # why it was not (fully) checked
    configured: bool = True

    @property
    def clean(self) -> bool:
        return not self.mismatches

    @property
    def repairable(self) -> bool:
        return any(m.kind in REPAIRABLE for m in self.mismatches)

    def kind_counts(self) -> dict[str, int]:
        """Mismatches per kind, every kind present (for the ``certd_drift`` gauge)."""
        return {k: sum(1 for m in self.mismatches if m.kind == k) for k in KINDS}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "configured": self.configured, "version": self.version,
                "serial": self.serial, "clean": self.clean, "note": self.note,
                "mismatches": [m.to_json() for m in self.mismatches]}


def check(cert: CertificateConfig, store: Store, *, probe_timeout: float = PROBE_TIMEOUT) -> CertDrift:
    """Compare config, store, deployed files and served certificate for ``cert``."""
    name = cert.name
    try:
        raw = store.load_journal(name)
        j = Journal.from_json(raw) if raw else None
        if j is not None and not j.finished:
            return CertDrift(name, note=f"a {j.kind} rotation is in progress at step {j.step.value}; not checked")
        current = store.current(name)
    except StoreUnreachable as e:  # the fleet's database is down: nothing known, so no drift either
        return CertDrift(name, note=f"not checked: {e}")
    except CertdError as e:
        return CertDrift(name, mismatches=(Mismatch("store", name, f"{name}: cannot read the store: {e}"),))
    if current is None:
        return CertDrift(name, note="no certificate issued yet")
    try:
        stored = store.load(name, current)
    except StoreUnreachable as e:
        return CertDrift(name, current, note=f"not checked: {e}")
    except CertdError as e:
        return CertDrift(name, current, mismatches=(
            Mismatch("store", f"version {current}", f"{name}: the current version {current} cannot be read: {e}"),))
    info = stored.bundle.info
    found: list[Mismatch] = []
    if set(info.identifiers) != set(cert.identifiers):
        found.append(Mismatch("config", "domains", f"{name}: configured names {sorted(cert.identifiers)}, the stored "
                              f"current certificate has {sorted(info.identifiers)} (a renewal is due)"))
    if info.key_type != cert.key_type:
        found.append(Mismatch("config", "key_type", f"{name}: configured key_type {cert.key_type}, the stored "
                              f"current certificate has {info.key_type} (a renewal is due)"))
    try:
        for line in deploy.check(cert, current, stored.bundle):
            found.append(Mismatch("deployed", line.split(": ", 1)[0], f"{name}: deployed {line}"))
    except CertdError as e:
        found.append(Mismatch("deployed", name, f"{name}: cannot check the deployed files: {e}"))
    for ep in cert.verify:
        served = verify.probe(ep, timeout=probe_timeout)
        problem = _served_problem(name, served, info.fingerprint_sha256, info.serial, current)
        if problem:
            found.append(Mismatch("served", f"{ep.host}:{ep.port}", problem))
    return CertDrift(name, current, info.serial, tuple(found))


def _served_problem(name: str, served: verify.Served, fingerprint: str, serial: str, version: int) -> str | None:
    ep = served.endpoint
    if served.info is None:
        return f"{name}: {ep}: {served.error or 'no certificate received'}"
    if served.info.fingerprint_sha256 != fingerprint:
        return f"{name}: {ep} serves serial {served.info.serial}, stored current is {serial} (version {version})"
    if not served.ok:
        return f"{name}: {ep} serves the current certificate, but {served.error or 'it does not validate'}"
    return None


def check_all(config: Config, store: Store, names: Iterable[str] | None = None, *,
              probe_timeout: float = PROBE_TIMEOUT) -> list[CertDrift]:
    """:func:`check` every configured certificate (or those named), side by side; then one
    row per certificate found in the store but not configured (when none are named)."""
    wanted = set(names) if names is not None else None  # a set: the daemon names thousands
    certs = [c for c in config.certificates if wanted is None or c.name in wanted]
    results = bounded_map(lambda c: check(c, store, probe_timeout=probe_timeout), certs, WORKERS)
    if wanted is None:
        try:
            configured = set(config.names)
            stray = [n for n in store.names() if n not in configured]
        except CertdError:
            stray = []
        results += [CertDrift(n, store.current(n), configured=False,
                              note="in the store but not configured; certd no longer manages it") for n in stray]
    return results


def repair_enabled(config: Config, cert: CertificateConfig) -> bool:
    """``[certificate.deploy] repair_drift`` when set, else ``[daemon] repair_drift``."""
    own = cert.deploy.repair_drift
    return config.daemon.repair_drift if own is None else own


def to_json(results: Iterable[CertDrift]) -> dict[str, Any]:
    """``certd drift --json``: ``{"drift": bool, "certificates": [{name, configured, version,
    serial, clean, note, mismatches: [{kind, subject, message}]}]}``."""
    rows = [r.to_json() for r in results]
    return {"drift": any(not r["clean"] for r in rows), "certificates": rows}


def lines(report: dict[str, Any]) -> list[str]:
    """``certd drift``'s text from a :func:`to_json` report (local or from the daemon): one line
    per mismatch; one line for a clean or unchecked certificate."""
    out: list[str] = []
    for row in report["certificates"]:
        if row["mismatches"]:
            out.extend(m["message"] for m in row["mismatches"])
        elif row["note"]:
            out.append(f"{row['name']}: {row['note']}")
        else:
            out.append(f"{row['name']}: OK: no drift (version {row['version']}, serial {row['serial']})")
    return out
