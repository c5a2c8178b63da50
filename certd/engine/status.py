"""Status: how each certificate stands, when it is next looked at, and whether the live
endpoints serve it. No lock is taken and nothing is written, but for the ARI cache the
planner keeps (see :mod:`certd.engine.planning`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from certd.config import CertificateConfig
from certd.core.errors import OperationFailed
from certd.engine.outcome import Outcome, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports


class Status:
    """The read-only use cases over ``ports`` and the shared ``planner``."""

    def __init__(self, ports: Ports, planner: Planner) -> None:
        self.ports, self.planner = ports, planner

    def plan(self, cert: CertificateConfig) -> tuple[datetime, str]:
        """When the daemon should next look at ``cert`` (see Planner.plan)."""
        return self.planner.plan(cert)

    def row(self, cert: CertificateConfig) -> dict[str, Any]:
        """One ``status --json`` row (see docs/CONTRACT.md); no network I/O."""
        return self.planner.status(cert)

    def row_json(self, cert: CertificateConfig, next_run: str | None = None) -> str:
        """:meth:`row` as one line of JSON text (with the daemon's ``next_run``)."""
        return self.planner.status_json(cert, next_run)

    def verify(self, cert: CertificateConfig) -> Outcome:
        """Whether every verify endpoint serves the current version now (a short handshake
        check): ``verified``, ``not_due`` without endpoints, else ``failed``."""
        current = self.ports.store.current(cert.name)
        if current is None:
            return Outcome(cert.name, Result.FAILED, "no certificate issued yet")
        if not cert.verify:
            return Outcome(cert.name, Result.NOT_DUE, "no [[certificate.verify]] endpoints configured", current)
        info = self.ports.store.load(cert.name, current).bundle.info
        try:
            served = self.ports.edges.served(cert, info.fingerprint_sha256, min(cert.verify_timeout, 3.0))
        except OperationFailed as e:
            return Outcome(cert.name, Result.FAILED, str(e), current, info.serial)
        return Outcome(cert.name, Result.VERIFIED, f"serial {info.serial} served on {', '.join(served)}",
                       current, info.serial)
