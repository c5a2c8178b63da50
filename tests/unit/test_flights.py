"""Single-flight per certificate (certd.daemon.scheduler.Flights): joining, and a forced renewal that
joins an unforced one which then renews nothing."""

from __future__ import annotations

import threading

import pytest

from certd.core.clock import FakeClock
from certd.daemon.scheduler import Flight, Flights, ShuttingDown

FORCED = {"force": True, "reason": "incident 7", "initiator": "uid=0(root)"}


def forced_joining(running: str = "scheduled") -> tuple[Flights, Flight]:
    """A ``running`` flight on 'www' that a forced renewal has joined."""
    flights = Flights(FakeClock())
    flight, _ = flights.begin("www", running)
    flights.begin("www", "forced", forced=FORCED)
    return flights, flight


def test_a_second_request_joins_the_flight_in_progress():
    """One flight per name: whoever comes second gets the running one, and its result."""
    flights = Flights(FakeClock())
    first, started = flights.begin("www", "scheduled")
    joined, started_again = flights.begin("www", "requested")
    assert started and not started_again and joined is first
    assert flights.end(first, "renewed") is None
    assert first.done and first.result == "renewed" and flights.in_progress() == []


def test_forced_renewal_joining_a_check_that_renewed_nothing_is_handed_back():
    """The unforced flight renewed nothing: end() keeps the flight open and returns the forced request."""
    flights, flight = forced_joining()
    assert flights.end(flight, "not_due", renewed=False) == FORCED
    assert not flight.done and flight.kind == "forced" and flights.in_progress() == [flight]
    late, started = flights.begin("www", "requested")
    assert late is flight and not started   # still one flight while the forced renewal runs
    assert flights.end(flight, "renewed") is None
    assert flight.done and flight.result == "renewed" and flights.in_progress() == []


def test_forced_renewal_joining_a_check_that_renewed_is_satisfied_by_it():
    """One order per certificate: a flight that did renew answers the forced request too."""
    flights, flight = forced_joining()
    assert flights.end(flight, "renewed", renewed=True) is None
    assert flight.done and flight.result == "renewed"


@pytest.mark.parametrize("running", ["forced", "rollback", "revoke"])
def test_forced_renewal_joining_anything_but_an_unforced_renewal_is_not_queued(running: str):
    """A forced flight renews anyway; a rollback or revocation is not followed by a renewal."""
    flights, flight = forced_joining(running)
    assert flights.end(flight, "not_due", renewed=False) is None and flight.done


def test_no_forced_renewal_is_started_once_shutting_down():
    """Shutting down: the queued forced renewal is not started, and the flight's answer says so."""
    flights, flight = forced_joining()
    flights.accepting = False
    assert flights.end(flight, "not_due", renewed=False, not_run=lambda r: f"{r}; forced renewal not run") is None
    assert flight.done and flight.result == "not_due; forced renewal not run" and flights.in_progress() == []
    with pytest.raises(ShuttingDown):
        flights.begin("other", "forced")


def test_a_follower_gets_every_event_then_the_end() -> None:
    """follow() yields the progress said so far and as it comes, and stops when the flight is done."""
    flights = Flights(FakeClock())
    flight, _ = flights.begin("www", "forced")
    flight.say("order created")
    seen = flight.follow()
    assert next(seen)["message"] == "order created"
    flight.say("finalizing")
    flights.end(flight, "renewed")
    assert [e["message"] for e in seen] == ["finalizing"]


def test_a_quiet_flight_ends_following_after_the_timeout_on_the_clock() -> None:
    """A follower with a timeout gives up once that much fake time passes without news."""
    clock = FakeClock()
    flights = Flights(clock)
    flight, _ = flights.begin("www", "forced")
    got: list[list[dict[str, str]]] = []
    follower = threading.Thread(target=lambda: got.append(list(flight.follow(timeout=30))))
    follower.start()
    clock.until_waiting()
    clock.advance(29.999)
    clock.until_waiting()
    assert got == []
    clock.advance(0.001)
    follower.join(10)
    assert got == [[]] and not flight.done


def test_wait_idle_waits_for_running_flights_up_to_its_timeout() -> None:
    """Shutting down waits for flights in progress: True once they end, False at the timeout."""
    clock = FakeClock()
    flights = Flights(clock)
    assert flights.wait_idle(5)                     # nothing in progress
    flight, _ = flights.begin("www", "scheduled")
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(flights.wait_idle(5)))
    waiter.start()
    clock.until_waiting()
    flights.end(flight, "renewed")
    waiter.join(10)
    assert answers == [True]
    stuck, _ = flights.begin("api", "scheduled")
    waiter = threading.Thread(target=lambda: answers.append(flights.wait_idle(5)))
    waiter.start()
    clock.until_waiting()
    clock.advance(5)
    waiter.join(10)
    assert answers == [True, False] and not stuck.done
