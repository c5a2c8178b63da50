"""The facade the daemon, the CLI and the benchmarks call: it wires the real ports (store, locks,
issuer, events, clock, deploy/reload/verify edges) once, and delegates each operation to its
use case, each a module of its own: :mod:`~certd.engine.renew`, :mod:`~certd.engine.rollback`,
:mod:`~certd.engine.revoke`, :mod:`~certd.engine.recover`, :mod:`~certd.engine.redeploy` and
:mod:`~certd.engine.status`, over :class:`~certd.engine.ports.Ports`. What they share: the
rotation driver (:mod:`~certd.engine.rotations`) and the planner (:mod:`~certd.engine.planning`).

Every operation on a certificate takes its per-certificate lock, then looks at the store again
before acting (another process may have just renewed it), and first finishes any rotation a
crash left unfinished. The manager itself holds only what outlives one operation: the
configuration (replaced on reload), the CA client (built on first use) and the planner's cache.
"""

from __future__ import annotations

import os
import pwd
import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from certd.config import CertificateConfig, Config
from certd.core.clock import Clock, SystemClock
from certd.core.errors import AcmeError, LockBusy, StoreError, UsageError
from certd.core.events import EventBus
from certd.core.rotation import Journal
from certd.engine.destruction import destroy_retired_keys
from certd.engine.effects import LocalEdges
from certd.engine.outcome import Outcome, RenewRequest, Result
from certd.engine.planning import Planner
from certd.engine.ports import IssuerPort, Ports, Progress
from certd.engine.recover import recover_all
from certd.engine.redeploy import redeploy
from certd.engine.renew import Renew, renew_all
from certd.engine.revoke import Revoke
from certd.engine.rollback import Rollback
from certd.engine.attempts import CertState
from certd.engine.statebook import Change
from certd.engine.status import Status
from certd.store.files import Store
from certd.store.opening import open_store

__all__ = ["Manager", "Outcome", "RenewRequest", "Result", "whoami"]


def whoami() -> str:
    """The initiator recorded for actions taken from this process's CLI."""
    uid = os.getuid()
    try:
        return f"uid={uid}({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid={uid}"


class Manager:
    """The operations on the configured certificates, over the real ports (or a test's store,
    issuer and clock)."""

    def __init__(self, config: Config, *, store: Store | None = None, issuer: IssuerPort | None = None,
                 clock: Clock | None = None, lock_timeout: float = 0.0, events: EventBus | None = None,
                 issuers: dict[str, IssuerPort] | None = None) -> None:
        events = events or EventBus()
        clock = clock or SystemClock()
        store = store or open_store(config)
        # one client (and so one account: accounts are keyed by directory URL) per CA name;
        # a test's ``issuer`` stands for every CA, its ``issuers`` for the ones it names
        self._fixed = issuer
        self._issuers: dict[str, IssuerPort] = dict(issuers or {})
        self._issuer_lock = threading.Lock()
        edges = LocalEdges(store, clock, events, trust=self._trust_anchors)
        self.ports = Ports(config, store, store, self._get_issuer, events, clock, edges,
                           lock_timeout=lock_timeout, ca_issuer=self._issuer_for)
        self.planner = Planner(store, clock, self._get_issuer, issuer_at=lambda meta: self.ports.issuer_of(meta))
        self.planner.on_broken = lambda name, why: self.emit("cert_broken", name, outcome="broken", reason=why)

    # -- what outlives one operation ------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.ports.config

    @config.setter
    def config(self, config: Config) -> None:
        self.reconfigure(config)

    @property
    def store(self) -> Store:
        return self.ports.store

    @property
    def clock(self) -> Clock:
        return self.ports.clock

    @property
    def events(self) -> EventBus:
        return self.ports.events

    @property
    def retries(self) -> bool:
        """True in the daemon, which retries failed renewals by itself; the one-shot CLI does
        not, so its messages must not say "will retry" (see attempts.next_step)."""
        return self.ports.retries

    @retries.setter
    def retries(self, value: bool) -> None:
        self.ports = replace(self.ports, retries=value)

    @property
    def issuer(self) -> IssuerPort:
        return self._get_issuer()

    def _get_issuer(self) -> IssuerPort:
        """The first CA's client."""
        return self._issuer_for(self.ports.config.acme.name)

    def _issuer_for(self, name: str) -> IssuerPort:
        """The client of the CA ``name``, built on first use; AcmeError if none is configured."""
        if self._fixed is not None:
            return self._fixed
        with self._issuer_lock:
            issuer = self._issuers.get(name)
            if issuer is None:
                ca = self.ports.config.ca_config(name)
                if ca is None:
                    raise AcmeError(f"no CA named {name!r} is configured (any more); configured: "
                                    f"{', '.join(c.name for c in self.ports.config.cas)}")
                # Imported here, not at the top: the ACME client (acme, josepy, requests: ~0.25 s)
                # is needed only once an order or an ARI poll happens, never by `certd status`.
                from certd.acme.issuer import connect
                events = self.ports.events
                issuer = self._issuers[name] = connect(
                    ca, self.ports.store, self.ports.clock,
                    on_request=lambda seconds: events.measure("acme_request", seconds))
            return issuer

    def _trust_anchors(self, meta: Mapping[str, Any]) -> Path | None:
        """The ``trust_anchors`` of the CA that issued the version with ``meta`` (verify checks
        that CA's chains against them; found as :meth:`certd.config.Config.issuing_ca`)."""
        ca = self.ports.config.issuing_ca(meta)
        return ca.trust_anchors if ca is not None else None

    def close(self) -> None:
        for issuer in [self._fixed, *self._issuers.values()]:
            if issuer is not None:
                issuer.close()

    def reconfigure(self, config: Config) -> None:
        """Use a new (validated) config from now on; rotations in flight keep theirs."""
        old = self.ports.config
        self.ports = replace(self.ports, config=config)
        if config.cas != old.cas:
            with self._issuer_lock:  # the next operation builds clients for the new CA settings
                self._issuers = {n: i for n, i in self._issuers.items() if config.ca_config(n) == old.ca_config(n)}

    def select(self, names: Iterable[str]) -> list[CertificateConfig]:
        """The configured certificates named (all when none named); UsageError for unknown names."""
        names = list(names)
        config = self.ports.config
        if not names:
            return list(config.certificates)
        known = set(config.names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"unknown certificate {', '.join(unknown)}; configured: {config.names_summary()}")
        return [config.certificate(n) for n in names]

    def emit(self, kind: str, name: str, **fields: Any) -> None:
        self.ports.emit(kind, name, **fields)

    def load_state(self, name: str) -> CertState:
        return self.planner.load_state(name)

    def save_state(self, name: str, state: CertState) -> None:
        """Replace the whole state (tests, tools); the engine's writes are :meth:`update_state`."""
        self.planner.save_state(name, state)

    def update_state(self, name: str, change: Change) -> CertState:
        """Apply ``change`` to the state by compare-and-set (certd.engine.statebook)."""
        return self.planner.update_state(name, change)

    # -- the use cases --------------------------------------------------------------------

    def renew(self, certs: Iterable[CertificateConfig], *, force: bool = False, reason: str = "",
              initiator: str = "scheduler", progress: Progress | None = None,
              workers: int | None = None, ignore_duplicate_limit: bool = False) -> list[Outcome]:
        """Renew each certificate that is due (all of them with ``force``), up to ``workers``
        (default ``[daemon] workers``) at a time; outcomes in the order of ``certs``."""
        requests = [RenewRequest(c, force=force, reason=reason, initiator=initiator,
                                 ignore_duplicate_limit=ignore_duplicate_limit) for c in certs]
        return renew_all(Renew(self.ports, self.planner), requests,
                         workers or self.ports.config.daemon.workers, progress)

    def renew_one(self, cert: CertificateConfig, *, force: bool = False, reason: str = "",
                  initiator: str = "scheduler", progress: Progress | None = None,
                  skip_backoff: bool = False, ignore_duplicate_limit: bool = False) -> Outcome:
        """See :mod:`certd.engine.renew`."""
        req = RenewRequest(cert, force=force, reason=reason, initiator=initiator, skip_backoff=skip_backoff,
                           ignore_duplicate_limit=ignore_duplicate_limit)
        return Renew(self.ports, self.planner)(req, progress)

    def resume_order(self, cert: CertificateConfig, *, initiator: str, timeout: float = 0.0) -> Outcome:
        """Finish the order another process journaled for ``cert`` and then stopped (a fleet
        node that died mid-order), or roll out the version it stored and did not roll out
        (:mod:`certd.engine.adopt`), waiting at most ``timeout`` seconds for the lease; nothing
        is ordered afresh: ``not_due`` when nothing is left to finish once the lease is held."""
        req = RenewRequest.resuming(cert, initiator)
        ports = replace(self.ports, lock_timeout=timeout)
        return Renew(ports, self.planner)(req)

    def dry_run(self, certs: list[CertificateConfig], *, server: str | None = None, initiator: str = "operator",
                progress: Progress | None = None) -> list[Outcome]:
        """See :mod:`certd.engine.dryrun`."""
        from certd.engine.dryrun import dry_run  # the ACME client: see _issuer_for
        return dry_run(self.ports, certs, server, initiator, progress)

    def rollback(self, cert: CertificateConfig, *, to_version: int | None = None, reason: str = "",
                 initiator: str = "operator", progress: Progress | None = None) -> Outcome:
        """See :mod:`certd.engine.rollback`."""
        return Rollback(self.ports, self.planner)(cert, to_version=to_version, reason=reason, initiator=initiator,
                                                  progress=progress)

    def revoke(self, cert: CertificateConfig, reason: str, *, initiator: str = "operator",
               progress: Progress | None = None) -> Outcome:
        """See :mod:`certd.engine.revoke`."""
        return Revoke(self.ports, self.planner)(cert, reason, initiator=initiator, progress=progress)

    def redeploy(self, cert: CertificateConfig, *, progress: Progress | None = None) -> Outcome:
        """See :mod:`certd.engine.redeploy`."""
        return redeploy(self.ports, self.planner, cert, progress)

    def destroy_retired(self, certs: Iterable[CertificateConfig] | None = None) -> dict[str, list[int]]:
        """Destroy the keys retired for ``destroy_after`` (see :mod:`certd.engine.destruction`)
        of ``certs`` (default: all); one whose lock is busy is left to the next pass (its
        rotation runs the pass itself when it commits). The versions destroyed, by name."""
        done: dict[str, list[int]] = {}
        for cert in self.ports.config.certificates if certs is None else certs:
            if cert.destroy_after is None:
                continue
            try:
                with self.ports.locks.lock(cert.name, timeout=0.0):
                    versions = destroy_retired_keys(self.ports, cert)
            except (LockBusy, StoreError):
                continue  # busy (or its lease cannot be written): the next pass
            if versions:
                done[cert.name] = versions
        return done

    def recover_all(self, workers: int = 1, stop: threading.Event | None = None) -> list[Journal]:
        """See :mod:`certd.engine.recover`."""
        return recover_all(self.ports, self.planner, workers, stop)

    # plan and status rows straight from the planner: called per certificate, 10,000 at a time

    def plan(self, cert: CertificateConfig) -> tuple[datetime, str]:
        """See :meth:`certd.engine.status.Status.plan`."""
        return self.planner.plan(cert)

    def status(self, cert: CertificateConfig) -> dict[str, Any]:
        """See :meth:`certd.engine.status.Status.row`."""
        return self.planner.status(cert)

    def status_json(self, cert: CertificateConfig, next_run: str | None = None) -> str:
        """See :meth:`certd.engine.status.Status.row_json`."""
        return self.planner.status_json(cert, next_run)

    def listing_json(self, certs: list[CertificateConfig], next_runs: Mapping[str, str]) -> Iterator[str]:
        """See :meth:`certd.engine.planning.Planner.listing_json`."""
        return self.planner.listing_json(certs, next_runs)

    def recheck(self, certs: list[CertificateConfig]) -> None:
        """See :meth:`certd.engine.planning.Planner.recheck`."""
        self.planner.recheck(certs)

    def verify_now(self, cert: CertificateConfig) -> Outcome:
        return Status(self.ports, self.planner).verify(cert)
