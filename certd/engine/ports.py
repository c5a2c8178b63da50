"""The ports the use cases run over: everything outside the engine they touch, in one value.

A use case (renew, roll back, revoke, recover, redeploy, status) is given a :class:`Ports`
and nothing else from the outside world, so a test hands it fakes (an issuer that signs
locally, edges that record what they were asked) and a real process hands it the real ones
(:class:`certd.engine.manager.Manager` wires them). The store is called only through the
methods of :class:`certd.store.files.Store`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Protocol

from certd.config import CertificateConfig, Config
from certd.core import rotation
from certd.core.clock import Clock
from certd.core.events import EventBus, LifecycleEvent
from certd.store.files import Store

if TYPE_CHECKING:  # the ACME client is imported only where an order happens (certd status never)
    from certd.acme.ari import RenewalInfo
    from certd.acme.resume import Twins

Say = Callable[[str], None]                 # one progress line about the certificate at hand
Progress = Callable[[str, str], None]       # (certificate name, message)


class IssuerPort(Protocol):
    """The CA, as the use cases use it (:class:`certd.acme.issuer.Issuer` for real)."""

    def issue(self, cert: CertificateConfig, key_pem: bytes, *, replaces: str | None = None,
              progress: Say | None = None, on_order: Callable[..., None] | None = None,
              before: Callable[[str], None] | None = None) -> bytes:
        """Order, prove control, finalize; the full chain (leaf first) as PEM. OperationFailed.
        ``on_order(url, profile)`` is told the order's URL and the profile asked for (None: the
        CA's default) after newOrder, before finalize (the order journal). ``before(step)`` runs
        right before newOrder and before finalize; what it raises ends the order there."""

    def resume(self, cert: CertificateConfig, order_url: str, key_pem: bytes, *,
               progress: Say | None = None, before: Callable[[str], None] | None = None) -> bytes | None:
        """Continue the order at ``order_url`` (no new order): the full chain as :meth:`issue`,
        or None when the CA cannot continue it (gone, invalid, expired). OperationFailed."""

    def find_order(self, cert: CertificateConfig, key_pem: bytes, *, profile: str | None = None,
                   newer_than: datetime | None = None, twins: Twins | None = None,
                   progress: Say | None = None) -> tuple[str | None, str]:
        """(the URL of the order an intent (journaled before newOrder, no URL) placed for ``cert``
        with ``key_pem``, from the account's orders list, or None when none is surely its; why).
        ``newer_than``: the newest stored version's notBefore; ``twins``: what the other
        certificates for these identifiers hold. CANotReachable only: any other failure finds nothing."""

    def renewal_info(self, cert_pem: bytes) -> RenewalInfo | None:
        """The CA's ARI window for ``cert_pem``; None when the CA has no ARI. OperationFailed."""

    def revoke(self, cert_pem: bytes, reason: int) -> None:
        """Revoke at the CA with RFC 5280 reason code ``reason``. OperationFailed."""

    def reachable(self) -> bool:
        """One cheap GET of the CA's directory through the transport: does it answer 200?"""

    def close(self) -> None: ...


class Locks(Protocol):
    """Per-certificate mutual exclusion across processes (today the store's own locks)."""

    def lock(self, name: str, *, timeout: float = 0.0) -> AbstractContextManager[None]: ...


class Edges(Protocol):
    """The deploy, reload and verify side: what touches the servers' files and processes
    (:class:`certd.engine.effects.LocalEdges` for real)."""

    def check_safe(self, cert: CertificateConfig) -> None:
        """StoreError when deploying ``cert`` would write where others can (before any order)."""

    def effects(self, cert: CertificateConfig, *, repair: bool = False) -> rotation.Effects:
        """The rotation's stage/switch/reload/verify/commit for ``cert``."""

    def prune(self, cert: CertificateConfig, keep: Collection[int]) -> None:
        """Remove deployed versions not in ``keep`` (never the live one)."""

    def destroy_keys(self, cert: CertificateConfig, keys: Collection[bytes], *,
                     spkis: Collection[str] = ()) -> list[Path]:
        """Zero and remove every non-live deployed copy of these keys (by PEM bytes, or by their
        public key's SPKI SHA-256 in ``spkis``); the paths removed."""

    def served(self, cert: CertificateConfig, fingerprint_sha256: str, timeout: float) -> list[str]:
        """The verify endpoints, once every one serves that leaf; OperationFailed otherwise."""


@dataclass(frozen=True)
class Ports:
    """What one use case may touch. ``issuer`` is a factory: the CA client is built on first
    use (status never needs one) and rebuilt after the CA settings change; it is the first
    CA's, ``ca_issuer(name)`` any configured CA's (one client and one account per CA; without
    it every CA is ``issuer()``). ``retries``: this process retries failed renewals by itself
    (the daemon), so its messages may say so."""

    config: Config
    store: Store
    locks: Locks
    issuer: Callable[[], IssuerPort]
    events: EventBus
    clock: Clock
    edges: Edges
    lock_timeout: float = 0.0
    retries: bool = False
    ca_issuer: Callable[[str], IssuerPort] | None = None

    def issuer_at(self, ca: str | None) -> IssuerPort:
        """The client of the CA named ``ca`` (None: the first CA); OperationFailed when no CA
        of that name is configured (any more)."""
        if ca is None or self.ca_issuer is None:
            return self.issuer()
        return self.ca_issuer(ca)

    def issuer_of(self, meta: Mapping[str, Any]) -> IssuerPort | None:
        """The client of the CA that issued the version with ``meta`` (see
        :meth:`certd.config.Config.issuing_ca`); None when that CA is no longer configured."""
        ca = self.config.issuing_ca(meta)
        return self.issuer_at(ca.name) if ca is not None else None

    def lock(self, name: str) -> AbstractContextManager[None]:
        """The certificate's lock, waiting at most ``lock_timeout`` seconds (StoreError)."""
        return self.locks.lock(name, timeout=self.lock_timeout)

    def emit(self, kind: str, name: str, **fields: Any) -> None:
        """A lifecycle event (audit log, metrics, alerts) stamped with the clock's time."""
        self.events.emit(LifecycleEvent(kind, name, self.clock.now(), **fields))


def sayer(name: str, progress: Progress | None) -> Say:
    """``progress`` bound to the certificate ``name`` (a no-op without one)."""
    def say(message: str) -> None:
        if progress is not None:
            progress(name, message)
    return say
