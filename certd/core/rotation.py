"""The rotation state machine and its journal.

A rotation moves one certificate from the version that is served now (``from_version``) to
another (``to_version``): a freshly issued one (kind ``renew``) or an older one (kind
``rollback``, asked for by an operator). It goes through these steps, and the journal is
written as each is reached (the store fsyncs the steps that decide recovery, and every
effect is durable before its step is written: docs/PERFORMANCE.md)::

    issued -> staged -> switched -> reloaded -> verified -> committed
                 |          |           |           |
                 v          +-----------+-----------+--> rolling_back -> rolled_back
               failed                                          |
                                                               +-----> rollback_failed

- ``issued``: the new version is in the store, not current; nothing a reader sees changed.
- ``staged``: the deploy targets hold the new files beside the live ones.
- ``switched``: one ``rename()`` per target made the new version live; the previous version
  stays on disk as the backup.
- ``reloaded``: the reload hooks ran and succeeded.
- ``verified``: every verify endpoint served the new leaf with a valid chain and name.
- ``committed``: the store's current pointer names the new version; old versions are pruned.

A failure before the switch ends in ``failed``: readers never saw anything. A failure at or
after the switch ends in ``rolling_back``: switch back to ``from_version``, run the hooks again
and prove by handshake that the old certificate is served again (``rolled_back``; when a hook
failed and the proof did not come, the hooks and the proof get one more round); if even that
fails, ``rollback_failed`` is the state to page someone for. A first issuance has nothing to
roll back to: it keeps the new version and records the failure (``failed`` with
``unverified=True``).

Crash safety: every transition is persisted before the next effect starts (a transition over
an effect that had nothing to do is persisted with the next one), and every effect is
idempotent (staging rewrites the same files, a switch to the live version is a no-op, hooks
and handshakes can run twice). So on start an unfinished journal is simply driven on from the
step it records: forward for the steps before ``verified`` (the handshake check still gates the
commit), to the end of the rollback for ``rolling_back``. That rule is deterministic and needs
no knowledge of how far an interrupted effect got.

This module is pure apart from :func:`drive`, which calls the :class:`Effects` it is given.
"""

from __future__ import annotations

import copy
import enum
import os
import secrets
import signal
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Callable, Collection, Protocol

from certd.core.clock import Clock, isoformat
from certd.core.errors import HookFailed, OperationFailed, StoreError, StoreUnreachable, VerificationFailed


class Step(str, enum.Enum):
    ISSUED = "issued"
    STAGED = "staged"
    SWITCHED = "switched"
    RELOADED = "reloaded"
    VERIFIED = "verified"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


TERMINAL = frozenset({Step.COMMITTED, Step.FAILED, Step.ROLLED_BACK, Step.ROLLBACK_FAILED})
SWITCHED_OR_LATER = frozenset({Step.SWITCHED, Step.RELOADED, Step.VERIFIED})


class Action(str, enum.Enum):
    STAGE = "stage"
    SWITCH = "switch"
    RELOAD = "reload"
    VERIFY = "verify"
    COMMIT = "commit"
    ROLL_BACK = "roll_back"


@dataclass(frozen=True)
class Journal:
    """The record of one rotation; persisted as JSON after every step."""

    id: str
    name: str
    kind: str                       # "renew" | "rollback"
    from_version: int | None
    to_version: int
    step: Step
    started: str                    # ISO 8601 UTC
    initiator: str = "scheduler"
    reason: str = ""
    error: str | None = None        # why it failed / rolled back
    rollback_error: str | None = None
    unverified: bool = False
    history: tuple[tuple[str, str], ...] = ()   # (step, time)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.step in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.step == Step.COMMITTED

    @property
    def result(self) -> str:
        """The short outcome shown as ``last_result``."""
        if not self.finished:
            return f"in_progress:{self.step.value}"
        if self.step == Step.COMMITTED:
            return "success" if self.kind == "renew" else "rolled_back_by_operator"
        return self.step.value if not self.unverified else "deployed_unverified"

    def to_json(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies recursively, ~10x the cost, at every step.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["step"] = self.step.value
        d["history"] = [list(h) for h in self.history]
        d["extra"] = copy.deepcopy(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Journal:
        try:
            d = dict(d)
            d["step"] = Step(d["step"])
            d["history"] = tuple(tuple(h) for h in d.get("history", ()))
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"journal for {d.get('name', '?')} is corrupt ({e}); move it aside to continue") from None


def start(name: str, kind: str, from_version: int | None, to_version: int, now: datetime, *,
          initiator: str, reason: str, step: Step = Step.ISSUED) -> Journal:
    """A new journal; a renewal starts at ``issued``, an operator rollback at ``issued`` too
    (the target version is already in the store)."""
    when = isoformat(now) or ""
    return Journal(secrets.token_hex(6), name, kind, from_version, to_version, step, when,
                   initiator, reason, history=((step.value, when),))


def next_action(j: Journal) -> Action | None:
    """What to do next from the journal's step; None when finished."""
    return {
        Step.ISSUED: Action.STAGE,
        Step.STAGED: Action.SWITCH,
        Step.SWITCHED: Action.RELOAD,
        Step.RELOADED: Action.VERIFY,
        Step.VERIFIED: Action.COMMIT,
        Step.ROLLING_BACK: Action.ROLL_BACK,
    }.get(j.step)


def failed_action(j: Journal) -> Action | None:
    """The action whose failure ended ``j`` in ``failed`` or sent it ``rolling_back`` (e.g.
    ``verify`` when the endpoints never served the new version); None if none failed."""
    steps = [s for s, _ in j.history]
    for before, after in zip(steps, steps[1:]):
        if after in (Step.FAILED.value, Step.ROLLING_BACK.value):
            return next_action(replace(j, step=Step(before)))
    return None


_ON_SUCCESS = {
    Action.STAGE: Step.STAGED,
    Action.SWITCH: Step.SWITCHED,
    Action.RELOAD: Step.RELOADED,
    Action.VERIFY: Step.VERIFIED,
    Action.COMMIT: Step.COMMITTED,
    Action.ROLL_BACK: Step.ROLLED_BACK,
}


def advance(j: Journal, action: Action, error: str | None, now: datetime) -> Journal:
    """The journal after ``action`` succeeded (``error`` None) or failed with ``error``."""
    when = isoformat(now) or ""
    if error is None:
        step = _ON_SUCCESS[action]
        return replace(j, step=step, history=j.history + ((step.value, when),))
    if action == Action.ROLL_BACK:
        step = Step.ROLLBACK_FAILED
        return replace(j, step=step, rollback_error=error, history=j.history + ((step.value, when),))
    if action == Action.STAGE:
        step = Step.FAILED
    elif j.from_version is None:
        # A first issuance: nothing to go back to; keep what is deployed, record the failure.
        step = Step.FAILED
        j = replace(j, unverified=True)
    else:
        step = Step.ROLLING_BACK
    return replace(j, step=step, error=error, history=j.history + ((step.value, when),))


class Effects(Protocol):
    """The edges a rotation drives; implemented for real by certd.engine.effects.RotationEffects
    (deploy, reload hooks, handshake, store), by fakes in tests.

    Every method must be idempotent: after a crash it may run again for the same version.
    Failures are raised as :class:`certd.core.errors.OperationFailed`.
    """

    def stage(self, version: int) -> None: ...
    def switch(self, version: int) -> None: ...

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        """Run the reload hooks. Normally the first failure raises; with ``keep_going`` every
        hook runs and the failures are returned (a rollback must reach every server)."""

    def verify(self, version: int) -> bool:
        """Prove by handshake that ``version`` is served; False when no endpoints are configured."""

    def commit(self, version: int) -> None: ...


def drive(j: Journal, effects: Effects, save: Callable[[Journal], None], clock: Clock,
          on_step: Callable[[Journal], None] | None = None, idle: Collection[Action] = ()) -> Journal:
    """Run ``j`` to a terminal step, persisting (``save``) after every transition.

    ``idle`` names actions that have nothing to do for this certificate (no deploy targets, no
    reload hooks, no verify endpoints): the step such an action reaches is persisted with the
    next one, since replaying a no-op after a crash is a no-op. That saves two fsyncs a skipped
    step (a rotation of a certificate with no deploy targets writes its journal twice, not six
    times). ``on_step`` is told of every new step (for progress output and audit). A commit
    failure (the store could not record the new current version) leaves the journal at the
    step before the commit so the next run finishes it; the error propagates. So does a store
    out of reach (a fleet's database restarting) at any step: the certificate is not at fault,
    rolling back would need the same database, and rolling back a good certificate would make
    the next attempt order another one (the fleet soak: two orders for one renewal); the next
    run resumes the rotation where the journal says, as after a crash.
    """
    while (action := next_action(j)) is not None:
        try:
            _perform(action, j, effects)
            error = None
        except StoreUnreachable:
            raise
        except OperationFailed as e:
            if action == Action.COMMIT:
                raise
            error = str(e)
        j = advance(j, action, error, clock.now())
        if error is not None or action not in idle or j.finished:
            save(j)
            crash_point(j.step)
        if on_step is not None:
            on_step(j)
    return j


def _perform(action: Action, j: Journal, effects: Effects) -> None:
    if action == Action.STAGE:
        effects.stage(j.to_version)
    elif action == Action.SWITCH:
        effects.switch(j.to_version)
    elif action == Action.RELOAD:
        effects.reload(j.to_version)
    elif action == Action.VERIFY:
        effects.verify(j.to_version)
    elif action == Action.COMMIT:
        effects.commit(j.to_version)
    elif action == Action.ROLL_BACK:
        # The hook that failed the rotation may fail again; what matters is that every server
        # is told and the handshake proves the old certificate is back. Only without verify
        # endpoints do hook errors decide. A server whose reload failed may have been
        # restarting (its supervisor brought it back with the certificate it read at start-up,
        # while the old pid file was still there) and was never told: so when a hook failed and
        # the old certificate is not proven back, every server is told once more.
        assert j.from_version is not None
        effects.stage(j.from_version)
        effects.switch(j.from_version)
        for attempt in (1, 2):
            hook_errors = effects.reload(j.from_version, keep_going=True)
            try:
                verified = effects.verify(j.from_version)
                break
            except StoreUnreachable:
                raise  # drive() leaves the rollback to resume, as for any step
            except OperationFailed as e:
                if not hook_errors:
                    raise
                if attempt == 2:
                    raise VerificationFailed(f"{e}; reload hooks failed: {'; '.join(hook_errors)}") from e
        if hook_errors and not verified:
            raise HookFailed("; ".join(hook_errors) + " (no verify endpoints to prove the rollback)")


CRASH_ENV = "CERTD_CRASH_AT"


def crash_point(step: Step) -> None:
    """Fault injection for the crash-safety tests: ``CERTD_CRASH_AT=<step>`` makes the process
    SIGKILL itself right after the journal for that step is persisted."""
    if os.environ.get(CRASH_ENV) == step.value:
        os.kill(os.getpid(), signal.SIGKILL)
