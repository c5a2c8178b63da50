"""The event bus: sinks see every event; a failing sink never breaks the caller."""

from __future__ import annotations

import pytest

from certd.core.clock import FakeClock
from certd.core.events import EventBus, LifecycleEvent


def test_every_sink_sees_every_event_even_after_one_fails():
    """A sink that raises is skipped; the others still get the event and emit() returns."""
    bus, seen = EventBus(), []

    def broken(ev: LifecycleEvent) -> None:
        raise OSError("disk full")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    ev = LifecycleEvent("renewed", "www", FakeClock().now(), new_serial="0a")
    bus.emit(ev)
    assert seen == [ev]


def test_unknown_event_kinds_are_refused():
    """Event kinds are a fixed vocabulary, so audit and metrics consumers can rely on them."""
    with pytest.raises(ValueError):
        LifecycleEvent("renewd", "www", FakeClock().now())
