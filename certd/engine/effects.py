"""The rotation's effects on the real edges (deploy, hooks, handshake verification, store),
the real :class:`~certd.engine.ports.Edges` port (:class:`LocalEdges`), and what the use cases
read off a journal: the progress text of each step, the actions that have nothing to do for a
certificate, the step that failed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from certd.deploy import stage as deploy
from certd.deploy import strictmodes
from certd.reload import hooks
from certd.core import rotation
from certd.verify import handshake as verify
from certd.core.clock import Clock
from certd.config import CertificateConfig, VerifyEndpoint
from certd.core.errors import OperationFailed
from certd.core.events import EventBus
from certd.core.model import Bundle
from certd.core.rotation import Journal, Step
from certd.store.files import Store


# a version's meta -> the trust_anchors of the CA that issued it (None: the endpoint's own)
Trust = Callable[[Mapping[str, Any]], "Path | None"]


class RotationEffects:
    """:class:`certd.core.rotation.Effects` for one certificate, on the real edges: ``stage`` and
    ``switch`` write the deploy targets (certd.deploy; the switch waits while nginx reads its
    certificates), ``reload`` runs the configured hooks (certd.reload), ``verify`` handshakes
    the endpoints (certd.verify), ``commit`` moves the store's current pointer. Pruning old
    versions and destroying compromised keys after a commit are the manager's, not these."""

    def __init__(self, store: Store, clock: Clock, events: EventBus, cert: CertificateConfig, *,
                 repair: bool = False, trust: Trust | None = None) -> None:
        self.store, self.clock, self.events, self.cert = store, clock, events, cert
        self.trust = trust  # the issuing CA's trust_anchors, by the version's meta
        self.repair = repair  # stage rewrites deployed files edited out of band (drift repair)
        self._bundles: dict[int, Bundle] = {}

    def _bundle(self, version: int) -> Bundle:
        if version not in self._bundles:
            self._bundles[version] = self.store.load(self.cert.name, version).bundle
        return self._bundles[version]

    def stage(self, version: int) -> None:
        deploy.stage(self.cert, version, self._bundle(version), repair=self.repair)

    def switch(self, version: int) -> None:
        # Not while nginx reads its certificates for another rotation: it opens cert and key
        # one after the other and would pair this switch's halves (see hooks.switching).
        with hooks.switching(self.cert.reload, self.cert.name):
            deploy.switch(self.cert, version)

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        ctx = hooks.HookContext(self.cert.name, self.cert.domains, version, self._bundle(version),
                                self.cert.deploy.live_dir, self.cert.deploy.combined)
        errors = []
        for hook in self.cert.reload:
            started = self.clock.monotonic()
            try:
                hooks.run_reload(hook, ctx, self.clock)
            except OperationFailed as e:
                if not keep_going:
                    raise
                errors.append(str(e))
            finally:
                self.events.measure("hook", self.clock.monotonic() - started, hook=hooks.hook_label(hook))
        return errors

    def verify(self, version: int) -> bool:
        if not self.cert.verify:
            return False
        endpoints = anchored(self.cert, self.store.load_info(self.cert.name, version).meta, self.trust)
        verify.await_served(endpoints, self._bundle(version).info.fingerprint_sha256,
                            timeout=self.cert.verify_timeout, clock=self.clock)
        return True

    def commit(self, version: int) -> None:
        self.store.set_current(self.cert.name, version)


class LocalEdges:
    """The Edges port on this host: deploy targets, reload hooks and handshakes as configured."""

    def __init__(self, store: Store, clock: Clock, events: EventBus, trust: Trust | None = None) -> None:
        self.store, self.clock, self.events, self.trust = store, clock, events, trust

    def check_safe(self, cert: CertificateConfig) -> None:
        strictmodes.require_safe(cert)

    def effects(self, cert: CertificateConfig, *, repair: bool = False) -> RotationEffects:
        return RotationEffects(self.store, self.clock, self.events, cert, repair=repair, trust=self.trust)

    def prune(self, cert: CertificateConfig, keep: Collection[int]) -> None:
        deploy.prune(cert, keep)

    def destroy_keys(self, cert: CertificateConfig, keys: Collection[bytes], *,
                     spkis: Collection[str] = ()) -> list[Path]:
        return deploy.destroy_keys(cert, keys, spkis=spkis)

    def served(self, cert: CertificateConfig, fingerprint_sha256: str, timeout: float) -> list[str]:
        endpoints = cert.verify
        current = self.store.current(cert.name) if self.trust is not None else None
        if current is not None:  # the current version's CA anchors the chain it serves
            stored = self.store.load_info(cert.name, current)
            if stored.info.fingerprint_sha256 == fingerprint_sha256:
                endpoints = anchored(cert, stored.meta, self.trust)
        served = verify.await_served(endpoints, fingerprint_sha256, timeout=timeout, clock=self.clock)
        return [str(s.endpoint) for s in served]


def anchored(cert: CertificateConfig, meta: Mapping[str, Any], trust: Trust | None) -> tuple[VerifyEndpoint, ...]:
    """``cert``'s verify endpoints, trusting the anchors of the CA that issued the version with
    ``meta`` when that CA has ``trust_anchors`` (several CAs: each chain ends at its own CA's
    root); otherwise each endpoint's ``ca_bundle`` (or the system store) as configured."""
    anchors = trust(meta) if trust is not None else None
    if anchors is None:
        return cert.verify
    return tuple(dataclasses.replace(e, ca_bundle=anchors) for e in cert.verify)


STEP_TEXT = {
    Step.STAGED: "staged version {j.to_version} beside the live files",
    Step.SWITCHED: "switched to version {j.to_version}",
    Step.RELOADED: "reload hooks succeeded",
    Step.VERIFIED: "verified: endpoints serve version {j.to_version}",
    Step.COMMITTED: "committed version {j.to_version}",
    Step.FAILED: "failed: {j.error}",
    Step.ROLLING_BACK: "rolling back to version {j.from_version}: {j.error}",
    Step.ROLLED_BACK: "rolled back: version {j.from_version} is served again (verified)",
    Step.ROLLBACK_FAILED: "ROLLBACK FAILED: {j.rollback_error}",
}


def unfinished_step(raw: dict[str, Any] | None) -> str | None:
    """The step of the unfinished rotation a journal records, else None: a status row needs
    only that, and building the Journal costs ~10x more (status reads thousands of them)."""
    if not raw:
        return None
    try:
        step = Step(raw["step"])
    except (KeyError, TypeError, ValueError):
        step = Journal.from_json(raw).step  # raises the StoreError that names the problem
    return None if step in rotation.TERMINAL else step.value


def idle_actions(cert: CertificateConfig) -> frozenset[rotation.Action]:
    """The rotation actions that have nothing to do for ``cert`` (see rotation.drive)."""
    idle = set()
    if cert.deploy.live_dir is None and cert.deploy.combined is None and not cert.deploy.files:
        idle |= {rotation.Action.STAGE, rotation.Action.SWITCH}
    if not cert.reload:
        idle.add(rotation.Action.RELOAD)
    if not cert.verify:
        idle.add(rotation.Action.VERIFY)
    return frozenset(idle)


def failed_step(j: Journal) -> str | None:
    action = rotation.failed_action(j)
    return action.value if action is not None else None
