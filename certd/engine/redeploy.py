"""Redeploy: put the current version back where the servers read it (drift repair).

Stage it again (rewriting deployed files edited out of band), switch, run the reload hooks and
verify by handshake, with the rotation's own effects. No journal: the target is the version
the store already names current and every step is idempotent, so an interrupted repair is
simply done again; the store is not changed. Outcome ``verified`` (or ``switched`` without
verify endpoints), ``not_due`` when nothing was issued yet, else ``failed``.
"""

from __future__ import annotations

import logging

from certd.config import CertificateConfig
from certd.core.errors import CertdError
from certd.engine.outcome import Outcome, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports, Progress, sayer
from certd.engine.rotations import Rotations
from certd.ops.log import event

log = logging.getLogger("certd")


def redeploy(ports: Ports, planner: Planner, cert: CertificateConfig, progress: Progress | None = None) -> Outcome:
    """Deploy ``cert``'s current version again, under its lock (see the module essay)."""
    say = sayer(cert.name, progress)
    rotations = Rotations(ports, planner)
    current: int | None = None
    try:
        with ports.lock(cert.name):
            rotations.resume(cert, say)
            current = ports.store.current(cert.name)
            if current is None:
                return Outcome(cert.name, Result.NOT_DUE, "no certificate issued yet; nothing to redeploy")
            effects = ports.edges.effects(cert, repair=True)
            effects.stage(current)
            effects.switch(current)
            effects.reload(current)
            verified = effects.verify(current)
    except CertdError as e:
        return Outcome(cert.name, Result.FAILED, f"redeploying version {current}: {e}", current)
    serial = rotations.serial(cert.name, current)
    event(log, "cert_redeployed", name=cert.name, version=current, serial=serial, verified=verified)
    return Outcome(cert.name, Result.VERIFIED if verified else Result.SWITCHED,
                   f"redeployed version {current}, serial {serial}" + ("; verified" if verified else ""),
                   current, serial)
