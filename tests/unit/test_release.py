"""The fleet release state machine (certd/core/release.py), with a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from certd.core.clock import FakeClock
from certd.core.release import (Effect, Facts, Release, Report, Rollout, State, advance, open_release,
                                pick_canaries)

OK, BAD = Report(True), Report(False, "reload failed")
NODES = ("node1", "node2", "node3")


def run(r: Release, facts: Facts, rollout: Rollout, clock: FakeClock) -> tuple[Release, Effect]:
    t = advance(r, facts, rollout, clock.now())
    assert t is not None, f"no transition from {r.state}"
    return t.release, t.effect


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.mark.parametrize("want,live,expected", [
    (1, NODES, ("node1",)),
    (2, ("node3", "node1"), ("node1", "node3")),
    (5, ("node2",), ("node2",)),
    (("node2",), NODES, ("node2",)),
    (("node9", "node2"), NODES, ("node2", "node1")),   # a named node that is down: replaced
    (("node9",), (), ()),
])
def test_canaries_are_picked_among_live_nodes(want: int | tuple[str, ...], live: tuple[str, ...],
                                              expected: tuple[str, ...]) -> None:
    """Canaries: the first N live nodes by name, or the named ones with a live stand-in for each one that is down."""
    assert pick_canaries(want, live) == expected


def test_a_release_goes_canary_promoted_fleet_done(clock: FakeClock) -> None:
    """A release whose canary and then every node verify ends done, moving the desired version once."""
    rollout = Rollout(canaries=1)
    r = open_release("www", 2, 1, clock.now())
    r, effect = run(r, Facts(NODES), rollout, clock)
    assert (r.state, r.canaries, effect) == (State.CANARY, ("node1",), Effect.NONE)
    assert advance(r, Facts(NODES), rollout, clock.now()) is None  # the canary has not reported
    r, effect = run(r, Facts(NODES, {"node1": OK}), rollout, clock)
    assert (r.state, effect) == (State.PROMOTED, Effect.PROMOTE)
    r, effect = run(r, Facts(NODES, {"node1": OK}), rollout, clock)
    assert (r.state, effect) == (State.FLEET, Effect.NONE)
    assert advance(r, Facts(NODES, {"node1": OK, "node2": OK}), rollout, clock.now()) is None
    r, effect = run(r, Facts(NODES, {"node1": OK, "node2": OK, "node3": OK}), rollout, clock)
    assert (r.state, effect) == (State.DONE, Effect.NONE)
    assert advance(r, Facts(NODES), rollout, clock.now()) is None
    assert Release.from_json(r.to_json()) == r


def test_a_canary_failure_aborts_and_marks_the_version_bad(clock: FakeClock) -> None:
    """One canary failing aborts the release: the desired version never moves, the version is marked bad."""
    r = open_release("www", 2, 1, clock.now())
    r, _ = run(r, Facts(NODES), Rollout(canaries=2), clock)
    r, effect = run(r, Facts(NODES, {"node1": OK, "node2": BAD}), Rollout(canaries=2), clock)
    assert (r.state, effect, r.failed) == (State.ABORTED, Effect.ABORT, ("node2",))
    assert "node2" in r.reason and "reload failed" in r.reason


def test_a_canary_that_goes_down_is_replaced(clock: FakeClock) -> None:
    """A canary that stops heartbeating before it reported is replaced by another live node."""
    r, _ = run(open_release("www", 2, 1, clock.now()), Facts(NODES), Rollout(), clock)
    r, effect = run(r, Facts(("node2", "node3")), Rollout(), clock)
    assert (r.state, r.canaries, effect) == (State.CANARY, ("node2",), Effect.NONE)
    assert "node1 down" in r.reason


def test_canaries_that_never_verify_abort_at_the_timeout(clock: FakeClock) -> None:
    """No canary verdict within fleet_timeout aborts; no live node at all waits until then, then aborts."""
    rollout = Rollout(fleet_timeout=60)
    r = open_release("www", 2, 1, clock.now())
    assert advance(r, Facts(()), rollout, clock.now()) is None
    clock.advance(timedelta(seconds=60))
    r2, effect = run(r, Facts(()), rollout, clock)
    assert (r2.state, effect) == (State.ABORTED, Effect.ABORT)
    r, _ = run(r, Facts(NODES), rollout, clock)
    clock.advance(timedelta(seconds=59))
    assert advance(r, Facts(NODES), rollout, clock.now()) is None
    clock.advance(timedelta(seconds=1))
    r, effect = run(r, Facts(NODES), rollout, clock)
    assert (r.state, effect) == (State.ABORTED, Effect.ABORT) and "did not verify" in r.reason


@pytest.mark.parametrize("threshold,state,effect", [
    (0, State.FLEET_ROLLED_BACK, Effect.ROLL_BACK),
    (1, State.DONE, Effect.NONE),
])
def test_failures_after_promotion_against_max_failed_nodes(clock: FakeClock, threshold: int, state: State,
                                                           effect: Effect) -> None:
    """A node failing after promotion rolls the fleet back beyond max_failed_nodes; within it, it is only named."""
    rollout = Rollout(canaries=1, max_failed_nodes=threshold)
    r = Release("www", 2, 1, State.FLEET, clock.now(), clock.now(), ("node1",))
    facts = Facts(NODES, {"node1": OK, "node2": OK, "node3": BAD})
    r, eff = run(r, facts, rollout, clock)
    if threshold:
        assert (r.state, r.failed, eff) == (State.FLEET, ("node3",), Effect.NONE)
        r, eff = run(r, facts, rollout, clock)
    assert (r.state, eff, r.failed) == (state, effect, ("node3",))


def test_a_hold_stops_widening_but_not_protecting(clock: FakeClock) -> None:
    """Held: the canaries are picked and run, promotion and done wait; an abort or fleet rollback still happens."""
    rollout = Rollout()
    r, _ = run(open_release("www", 2, 1, clock.now()), Facts(NODES, held=True), rollout, clock)
    assert r.state == State.CANARY
    assert advance(r, Facts(NODES, {"node1": OK}, held=True), rollout, clock.now()) is None
    aborted, effect = run(r, Facts(NODES, {"node1": BAD}, held=True), rollout, clock)
    assert (aborted.state, effect) == (State.ABORTED, Effect.ABORT)
    promoted, _ = run(r, Facts(NODES, {"node1": OK}), rollout, clock)
    assert advance(promoted, Facts(NODES, {"node1": OK}, held=True), rollout, clock.now()) is None
    rolled, effect = run(promoted, Facts(NODES, {"node1": OK, "node2": BAD}, held=True), rollout, clock)
    assert (rolled.state, effect) == (State.FLEET_ROLLED_BACK, Effect.ROLL_BACK)


def test_no_canaries_promotes_at_once_and_silent_nodes_end_at_the_timeout(clock: FakeClock) -> None:
    """canaries = 0 promotes at once; at fleet_timeout the release is done, naming the nodes that never reported."""
    rollout = Rollout(canaries=0, fleet_timeout=30)
    r, effect = run(open_release("www", 2, 1, clock.now()), Facts(NODES), rollout, clock)
    assert (r.state, effect) == (State.PROMOTED, Effect.PROMOTE)
    r, _ = run(r, Facts(NODES), rollout, clock)
    clock.advance(timedelta(seconds=30))
    r, _ = run(r, Facts(NODES, {"node1": OK, "node2": OK}), rollout, clock)
    assert r.state == State.DONE and "node3" in r.reason


def test_a_release_is_superseded_when_desired_moves_outside_it(clock: FakeClock) -> None:
    """A revocation's re-key or an operator's rollback moves desired: before promotion the release aborts, after it ends."""
    r, _ = run(open_release("www", 2, 1, clock.now()), Facts(NODES, desired=1), Rollout(), clock)
    aborted, effect = run(r, Facts(NODES, {"node1": OK}, desired=3), Rollout(), clock)
    assert (aborted.state, effect) == (State.ABORTED, Effect.ABORT) and "superseded" in aborted.reason
    promoted, _ = run(r, Facts(NODES, {"node1": OK}, desired=1), Rollout(), clock)
    assert promoted.state == State.PROMOTED
    ended, effect = run(promoted, Facts(NODES, desired=3), Rollout(), clock)
    assert (ended.state, effect) == (State.DONE, Effect.NONE) and "superseded" in ended.reason
    assert advance(promoted, Facts(NODES, {"node1": OK}, desired=2), Rollout(), clock.now()) is not None


@pytest.mark.parametrize("step,reports,held,canaries", [
    ("issued", {}, False, 1),
    ("issued", {}, False, 0),                 # no canary step: it would be promoted at once
    ("canary", {"node1": OK}, False, 1),      # every canary verified: it would be promoted
    ("canary", {"node1": OK}, True, 1),       # held: an abort is never held back
])
def test_a_version_that_may_not_be_deployed_aborts_before_promotion(clock: FakeClock, step: str,
                                                                    reports: dict[str, Report], held: bool,
                                                                    canaries: int) -> None:
    """The candidate was revoked or its key compromised before promotion: the release aborts (marked bad)."""
    rollout = Rollout(canaries=canaries)
    r = open_release("www", 2, 1, clock.now())
    if step == "canary":
        r, _ = run(r, Facts(NODES), rollout, clock)
    why = "www version 2 has a compromised key; it cannot be deployed again"
    r, effect = run(r, Facts(NODES, reports, held, refusal=why), rollout, clock)
    assert (r.state, effect) == (State.ABORTED, Effect.ABORT) and why in r.reason


@pytest.mark.parametrize("want,hollow,expected", [
    (1, {"node1"}, ("node2",)),                        # node1 cannot handshake: skipped
    (2, {"node1", "node2"}, ("node3",)),               # fewer verifying nodes than asked: those only
    (1, set(NODES), ("node1",)),                       # nobody verifies: the canaries prove the reload only
    (("node1",), {"node1"}, ("node1",)),               # named: the operator's choice (check-config refuses it)
])
def test_hollow_nodes_are_not_picked_as_canaries_by_count(want: int | tuple[str, ...], hollow: set[str],
                                                         expected: tuple[str, ...]) -> None:
    """Picked by count, a node with no verify endpoints for the certificate is not a canary while one that verifies is live."""
    assert pick_canaries(want, NODES, hollow=hollow) == expected


def test_a_hollow_canary_is_not_picked_at_the_canary_step(clock: FakeClock) -> None:
    """The release's canary step, given the hollow nodes, picks the first live node that can verify."""
    r, _ = run(open_release("www", 2, 1, clock.now()), Facts(NODES, hollow=frozenset({"node1"})), Rollout(), clock)
    assert r.canaries == ("node2",)
