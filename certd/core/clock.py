"""The only module that reads the time.

Everything else takes a :class:`Clock`, so tests drive time with :class:`FakeClock` and
assert exact instants without sleeping. All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol, overload


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock, for deadlines."""

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds`` (a fake clock just advances)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to (``advance``) or when slept on."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._mono = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float | timedelta) -> None:
        delta = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        with self._lock:
            self._now += timedelta(seconds=delta)
            self._mono += delta


def utc(dt: datetime) -> datetime:
    """Return ``dt`` as aware UTC; a naive value is taken to be UTC already."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


@overload
def isoformat(dt: datetime) -> str: ...
@overload
def isoformat(dt: None) -> None: ...
@overload
def isoformat(dt: datetime | None) -> str | None: ...
def isoformat(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, second precision; None stays None."""
    if dt is None:
        return None
    return utc(dt).replace(microsecond=0).isoformat().replace("+00:00", "Z")
