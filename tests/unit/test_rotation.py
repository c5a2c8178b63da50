"""The rotation state machine, driven with fake effects and a fake clock."""

from __future__ import annotations

import pytest

from certd.core import rotation
from certd.core.clock import FakeClock
from certd.core.errors import HookFailed, StoreError, StoreUnreachable, VerificationFailed
from certd.core.rotation import Action, Journal, Step


class FakeEffects:
    """Records every effect; fails the ones named in ``fail`` (action, version): every time,
    or, given a list, once per exception in it (then the effect works)."""

    def __init__(self, fail: dict[tuple[str, int], Exception | list[Exception]] | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail or {}
        self.live: int | None = 1

    def _do(self, what: str, version: int) -> None:
        self.calls.append((what, version))
        failure = self.fail.get((what, version))
        if isinstance(failure, list):
            failure = failure.pop(0) if failure else None
        if failure is not None:
            raise failure

    def stage(self, version: int) -> None:
        self._do("stage", version)

    def switch(self, version: int) -> None:
        self._do("switch", version)
        self.live = version

    def reload(self, version: int, *, keep_going: bool = False) -> list[str]:
        try:
            self._do("reload", version)
        except HookFailed as e:
            if not keep_going:
                raise
            return [str(e)]
        return []

    def verify(self, version: int) -> bool:
        self._do("verify", version)
        return self.has_endpoints

    has_endpoints = True

    def commit(self, version: int) -> None:
        self._do("commit", version)


def run(effects: FakeEffects, j: Journal | None = None) -> tuple[Journal, list[Journal]]:
    clock = FakeClock()
    saved: list[Journal] = []
    j = j or rotation.start("www", "renew", 1, 2, clock.now(), initiator="test", reason="")
    return rotation.drive(j, effects, saved.append, clock), saved


def test_happy_path_goes_through_every_step_in_order():
    """A rotation that works stages, switches, reloads, verifies and commits, saving each step."""
    fx = FakeEffects()
    j, saved = run(fx)
    assert j.step == Step.COMMITTED and j.result == "success"
    assert [s.step for s in saved] == [Step.STAGED, Step.SWITCHED, Step.RELOADED, Step.VERIFIED, Step.COMMITTED]
    assert fx.calls == [("stage", 2), ("switch", 2), ("reload", 2), ("verify", 2), ("commit", 2)]


def test_steps_over_idle_actions_are_saved_with_the_next_one():
    """Transitions over actions with nothing to do are persisted with the next step; all are still reported."""
    fx, clock, saved, seen = FakeEffects(), FakeClock(), [], []
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    idle = {Action.STAGE, Action.SWITCH, Action.VERIFY}
    j = rotation.drive(j0, fx, saved.append, clock, seen.append, idle=idle)
    assert j.step == Step.COMMITTED
    assert [s.step for s in saved] == [Step.RELOADED, Step.COMMITTED]
    assert [s.step for s in seen] == [Step.STAGED, Step.SWITCHED, Step.RELOADED, Step.VERIFIED, Step.COMMITTED]
    assert [h[0] for h in saved[-1].history] == ["issued", "staged", "switched", "reloaded", "verified", "committed"]


def test_a_failing_idle_action_is_saved_at_once():
    """A failure is always persisted, even for an action declared idle."""
    fx, clock, saved = FakeEffects({("verify", 2): VerificationFailed("x")}), FakeClock(), []
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    rotation.drive(j0, fx, saved.append, clock, idle={Action.VERIFY})
    assert [s.step for s in saved] == [Step.STAGED, Step.SWITCHED, Step.RELOADED, Step.ROLLING_BACK, Step.ROLLED_BACK]


@pytest.mark.parametrize("failing,error", [
    ("reload", HookFailed("nginx -t exited 1")),
    ("verify", VerificationFailed("served serial 0a, expected 7c")),
    ("switch", StoreError("rename failed: read-only file system")),
])
def test_failure_after_switch_rolls_back_to_the_previous_version(failing, error):
    """Any failure at or after the switch switches back, reloads and verifies the old version."""
    fx = FakeEffects({(failing, 2): error})
    j, _ = run(fx)
    assert j.step == Step.ROLLED_BACK
    assert j.error == str(error)
    assert fx.calls[-4:] == [("stage", 1), ("switch", 1), ("reload", 1), ("verify", 1)]
    assert fx.live == 1
    assert ("commit", 2) not in fx.calls


def test_failed_staging_changes_nothing_a_reader_sees():
    """A staging failure (disk full) ends the rotation without switching or rolling back."""
    fx = FakeEffects({("stage", 2): StoreError("No space left on device")})
    j, _ = run(fx)
    assert j.step == Step.FAILED and not j.unverified
    assert fx.calls == [("stage", 2)]


def test_rollback_that_fails_ends_in_rollback_failed():
    """If the old version cannot be proven served either, the journal says rollback_failed."""
    fx = FakeEffects({("verify", 2): VerificationFailed("new not served"),
                      ("verify", 1): VerificationFailed("old not served")})
    j, _ = run(fx)
    assert j.step == Step.ROLLBACK_FAILED
    assert j.error == "new not served" and j.rollback_error == "old not served"


def test_hook_failing_again_during_rollback_does_not_fail_a_verified_rollback():
    """The hook that broke the rotation fails again on the way back; the handshake still proves the rollback."""
    fx = FakeEffects({("reload", 2): HookFailed("lb said no"), ("reload", 1): HookFailed("lb said no")})
    j, _ = run(fx)
    assert j.step == Step.ROLLED_BACK
    assert ("verify", 1) in fx.calls


def test_rollback_whose_hook_failed_tells_every_server_once_more_before_giving_up():
    """A server restarting during the rollback's reload missed it: a second round of hooks brings the old certificate back."""
    fx = FakeEffects({("reload", 2): HookFailed("kill(123, 1) failed (3: No such process)"),
                      ("reload", 1): [HookFailed("kill(123, 1) failed (3: No such process)")],
                      ("verify", 1): [VerificationFailed("served the new serial 0b")]})
    j, _ = run(fx)
    assert j.step == Step.ROLLED_BACK
    assert fx.calls[-6:] == [("stage", 1), ("switch", 1), ("reload", 1), ("verify", 1), ("reload", 1), ("verify", 1)]


def test_rollback_failing_twice_names_what_was_served_and_why_the_hooks_failed():
    """Two rounds without proof: rollback_failed, with the handshake's finding and the hook's error."""
    fx = FakeEffects({("reload", 2): HookFailed("lb said no"), ("reload", 1): HookFailed("lb down"),
                      ("verify", 1): VerificationFailed("served the new serial 0b")})
    j, _ = run(fx)
    assert j.step == Step.ROLLBACK_FAILED
    assert j.rollback_error == "served the new serial 0b; reload hooks failed: lb down"
    assert fx.calls.count(("reload", 1)) == 2


def test_rollback_without_hook_errors_is_not_retried():
    """Hooks all worked and the old certificate is still not served: no second round, rollback_failed."""
    fx = FakeEffects({("verify", 2): VerificationFailed("new not served"),
                      ("verify", 1): [VerificationFailed("old not served")]})
    j, _ = run(fx)
    assert j.step == Step.ROLLBACK_FAILED and j.rollback_error == "old not served"
    assert fx.calls.count(("reload", 1)) == 1


def test_rollback_with_failing_hooks_and_no_endpoints_is_not_proven():
    """Without verify endpoints, a hook failing during rollback leaves it unproven: rollback_failed."""
    fx = FakeEffects({("reload", 2): HookFailed("lb said no"), ("reload", 1): HookFailed("lb said no")})
    fx.has_endpoints = False
    j, _ = run(fx)
    assert j.step == Step.ROLLBACK_FAILED and "no verify endpoints" in (j.rollback_error or "")


def test_first_issuance_keeps_the_new_version_when_verification_fails():
    """With no previous version there is nothing to roll back to: keep it, mark it unverified."""
    fx = FakeEffects({("verify", 1): VerificationFailed("endpoint down")})
    clock = FakeClock()
    j0 = rotation.start("www", "renew", None, 1, clock.now(), initiator="t", reason="")
    j, _ = run(fx, j0)
    assert j.step == Step.FAILED and j.unverified and j.result == "deployed_unverified"
    assert ("stage", 1) in fx.calls and ("switch", 1) in fx.calls


def test_commit_failure_leaves_the_journal_resumable_at_verified():
    """If recording the new current version fails, the error surfaces and the journal stays at verified."""
    fx = FakeEffects({("commit", 2): StoreError("disk full")})
    clock = FakeClock()
    saved: list[Journal] = []
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    with pytest.raises(StoreError):
        rotation.drive(j0, fx, saved.append, clock)
    assert saved[-1].step == Step.VERIFIED
    fx.fail.clear()
    j = rotation.drive(saved[-1], fx, saved.append, clock)
    assert j.step == Step.COMMITTED


def test_a_store_out_of_reach_while_rolling_back_leaves_the_rollback_to_resume() -> None:
    """Verify of the new version failed, and while rolling back (a reload hook failing too) the
    fleet's database goes away under the old version's verify: the rollback is resumed later,
    not ended as rollback_failed for good."""
    fx = FakeEffects({("verify", 2): VerificationFailed("served serial 1"),
                      ("reload", 1): [HookFailed("nginx down"), HookFailed("nginx down")],
                      ("verify", 1): [StoreUnreachable("PostgreSQL store: database unreachable")]})
    clock = FakeClock()
    saved: list[Journal] = []
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    with pytest.raises(StoreUnreachable):
        rotation.drive(j0, fx, saved.append, clock)
    assert saved[-1].step == Step.ROLLING_BACK, saved[-1]
    j = rotation.drive(saved[-1], fx, saved.append, clock)
    assert j.step == Step.ROLLED_BACK, j


@pytest.mark.parametrize("failing", ["stage", "switch", "reload", "verify"])
def test_a_store_out_of_reach_leaves_the_rotation_to_resume_not_to_roll_back(failing: str) -> None:
    """A fleet's database restarting under a step (StoreUnreachable): the error surfaces, the
    journal stays at the step before (nothing rolled back: the certificate is good, and rolling it
    back made the next attempt order another one), and the next run finishes the rotation."""
    fx = FakeEffects({(failing, 2): StoreUnreachable("PostgreSQL store: database unreachable")})
    clock = FakeClock()
    saved: list[Journal] = []
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    with pytest.raises(StoreUnreachable):
        rotation.drive(j0, fx, saved.append, clock)
    assert all(j.step not in (Step.ROLLING_BACK, Step.ROLLED_BACK, Step.FAILED) for j in saved), saved
    assert ("stage", 1) not in fx.calls
    fx.fail.clear()
    j = rotation.drive(saved[-1] if saved else j0, fx, saved.append, clock)
    assert j.step == Step.COMMITTED


@pytest.mark.parametrize("step,expected_first", [
    (Step.ISSUED, ("stage", 2)),
    (Step.STAGED, ("switch", 2)),
    (Step.SWITCHED, ("reload", 2)),
    (Step.RELOADED, ("verify", 2)),
    (Step.VERIFIED, ("commit", 2)),
    (Step.ROLLING_BACK, ("stage", 1)),
])
def test_resuming_from_any_step_continues_deterministically(step, expected_first):
    """An unfinished journal is driven on from the step it records, never restarted."""
    clock = FakeClock()
    j0 = rotation.start("www", "renew", 1, 2, clock.now(), initiator="t", reason="")
    j0 = rotation.Journal.from_json({**j0.to_json(), "step": step.value})
    fx = FakeEffects()
    j, _ = run(fx, j0)
    assert fx.calls[0] == expected_first
    assert j.step == (Step.ROLLED_BACK if step == Step.ROLLING_BACK else Step.COMMITTED)


def test_journal_round_trips_through_json():
    """What is saved is what is loaded, so a restart sees the same rotation."""
    clock = FakeClock()
    j = rotation.start("www", "rollback", 3, 2, clock.now(), initiator="uid=0(root)", reason="bad chain")
    j = rotation.advance(j, Action.STAGE, None, clock.now())
    assert Journal.from_json(j.to_json()) == j


def test_corrupt_journal_is_a_clear_store_error():
    """A journal that does not parse says how to get going again."""
    with pytest.raises(StoreError, match="move it aside"):
        Journal.from_json({"name": "www", "step": "bogus"})
