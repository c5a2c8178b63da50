"""Roll back: deploy an earlier stored version through the same stage, switch, reload and verify
path as a renewal; if the target cannot be verified, the current version is put back.

Outcomes: ``switched`` (the target is committed and verified), ``rolled_back`` /
``rollback_failed`` (the target failed, and returning to the current one worked / did not),
``failed`` (a lock or store error). A request that cannot be honoured (no such version, the
current one, revoked, compromised, expired) raises UsageError: the operator asked wrongly.
"""

from __future__ import annotations

from certd.config import CertificateConfig
from certd.core.clock import isoformat
from certd.core.errors import CertdError, UsageError
from certd.engine import releases
from certd.engine.outcome import Outcome, Result
from certd.engine.planning import Planner
from certd.engine.ports import Ports, Progress, sayer
from certd.engine.rotations import Rotations


class Rollback:
    """The roll-back use case over ``ports``."""

    def __init__(self, ports: Ports, planner: Planner) -> None:
        self.ports, self.planner = ports, planner
        self.rotations = Rotations(ports, planner)

    def __call__(self, cert: CertificateConfig, *, to_version: int | None = None, reason: str = "",
                 initiator: str = "operator", progress: Progress | None = None) -> Outcome:
        """Switch back to ``to_version`` (default: the previous good version)."""
        say, clock = sayer(cert.name, progress), self.ports.clock
        try:
            with self.ports.lock(cert.name):
                self.rotations.resume(cert, say)
                current = self.ports.store.current(cert.name)
                if current is None:
                    raise UsageError(f"{cert.name} has no certificate yet; nothing to roll back")
                target = to_version if to_version is not None else self._previous_good(cert.name, current)
                self._check_target(cert.name, current, target)
                started = clock.monotonic()
                say(f"rolling back from version {current} to {target}")
                j = self.rotations.start(cert, "rollback", current, target, initiator, reason)
                j = self.rotations.drive(cert, j, say)
                outcome = self.rotations.finish(cert, j, self.planner.load_state(cert.name),
                                                clock.monotonic() - started)
                if outcome.result == Result.SWITCHED:  # in a fleet: every node follows; the version left is bad
                    releases.fleet_rollback_done(self.ports, cert, current, target, initiator, reason)
                return outcome
        except UsageError:
            raise
        except CertdError as e:
            return Outcome(cert.name, Result.FAILED, str(e))

    def _previous_good(self, name: str, current: int) -> int:
        """The version the last successful rotation replaced, else the newest older one."""
        store = self.ports.store
        j = self.rotations.load_journal(name)
        if j is not None and j.succeeded and j.to_version == current and j.from_version is not None \
                and j.from_version in store.versions(name) \
                and releases.bad_refusal(self.ports, name, j.from_version) is None:
            return j.from_version
        # a version a fleet release marked bad is never the default (S3: it is refused anyway)
        older = [v for v in store.versions(name) if v < current and releases.bad_refusal(self.ports, name, v) is None]
        if not older:
            raise UsageError(f"{name} has no earlier version to roll back to (versions: {store.versions(name)})")
        return older[-1]

    def _check_target(self, name: str, current: int, target: int) -> None:
        """UsageError unless ``target`` may be deployed instead of ``current``."""
        versions = self.ports.store.versions(name)
        if target not in versions:
            raise UsageError(f"{name} has no version {target}; stored versions: {', '.join(map(str, versions))}")
        if target == current:
            raise UsageError(f"{name} version {target} is already current")
        # S3: the one predicate every deploy asks, then what only a fleet's desired version needs
        refusal = releases.deploy_refusal(self.ports.store, name, target) \
            or releases.unpromoted_refusal(self.ports, name, target)
        if refusal is not None:
            raise UsageError(refusal)
        info = self.ports.store.load_info(name, target).info
        if info.not_after <= self.ports.clock.now():
            raise UsageError(f"{name} version {target} expired at {isoformat(info.not_after)}; "
                             f"choose a newer one")
