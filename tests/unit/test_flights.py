"""Single-flight per certificate (certd.daemon.scheduler.Flights): joining, and a forced renewal that
joins an unforced one which then renews nothing."""

from __future__ import annotations

import pytest

from certd.daemon.scheduler import Flight, Flights, ShuttingDown

FORCED = {"force": True, "reason": "incident 7", "initiator": "uid=0(root)"}


def forced_joining(running: str = "scheduled") -> tuple[Flights, Flight]:
    """A ``running`` flight on 'www' that a forced renewal has joined."""
    flights = Flights()
    flight, _ = flights.begin("www", running)
    flights.begin("www", "forced", forced=FORCED)
    return flights, flight


def test_a_second_request_joins_the_flight_in_progress():
    """One flight per name: whoever comes second gets the running one, and its result."""
    flights = Flights()
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
