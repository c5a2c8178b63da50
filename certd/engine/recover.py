"""Recover: at daemon start, finish every rotation a crash left unfinished.

A crash in the middle of many rotations leaves many to finish, each waiting for its servers'
reload; one after the other (a 200-site nginx reloads in seconds) the daemon would renew
nothing else for minutes, while side by side they share reloads. One that cannot be finished
(a corrupt journal, a lock held elsewhere) is logged and left for its next renewal attempt,
which reports it: it must not keep every other certificate from being renewed.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from certd.config import CertificateConfig
from certd.core.errors import CertdError
from certd.core.rotation import Journal
from certd.engine.planning import Planner
from certd.engine.ports import Ports, sayer
from certd.engine.rotations import Rotations, to_resume
from certd.ops.log import event

log = logging.getLogger("certd")


def recover_all(ports: Ports, planner: Planner, workers: int = 1,
                stop: threading.Event | None = None) -> list[Journal]:
    """Finish every unfinished rotation of the configured certificates, ``workers`` at a time;
    the journals as they ended.

    Once ``stop`` is set (SIGTERM while starting), those already being finished reach their
    end and the rest are left to their journals for the next start: a stop must not wait for
    hundreds of reloads."""
    rotations = Rotations(ports, planner)
    pending = []
    for cert in ports.config.certificates:
        if to_resume(rotations.load_journal(cert.name)):
            pending.append(cert)  # no lock needed to know that (10,000 locks: ~0.5 s)

    deferred: list[str] = []

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    def finish(cert: CertificateConfig) -> Journal | None:
        try:
            if not stopping():
                with ports.lock(cert.name):  # resume() looks again
                    if not stopping():  # waiting for the lock may have taken a while
                        return rotations.resume(cert, sayer(cert.name, None))
        except CertdError as e:
            event(log, "recovery_failed", logging.ERROR, name=cert.name, error=str(e))
            return None
        deferred.append(cert.name)
        return None

    if workers <= 1 or len(pending) <= 1:
        results = [finish(cert) for cert in pending]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(pending)), thread_name_prefix="certd-recover") as pool:
            results = list(pool.map(finish, pending))
    if deferred:
        event(log, "recovery_deferred", logging.WARNING, count=len(deferred), names=",".join(deferred[:8]),
              reason="stopping; the next start finishes them")
    return [j for j in results if j is not None]
