"""certd.core.retry_after: Retry-After as delay-seconds or any HTTP-date form (RFC 9110 §10.2.3)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from certd.core.retry_after import retry_after_seconds

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("header, seconds", [
    ("120", 120.0),
    (" 7 ", 7.0),                                      # surrounding whitespace is not part of the value
    ("0", 0.0),
    ("Mon, 04 May 2026 12:00:30 GMT", 30.0),           # IMF-fixdate
    ("Monday, 04-May-26 12:01:00 GMT", 60.0),          # obsolete RFC 850 form
    ("Mon May  4 12:02:00 2026", 120.0),               # asctime: no zone, UTC by definition
    ("Mon, 04 May 2026 11:00:00 GMT", 0.0),            # in the past: now
])
def test_delay_seconds_and_every_http_date_form_are_read(header: str, seconds: float) -> None:
    """delay-seconds is taken as given; an HTTP-date becomes the seconds left until it, never negative."""
    assert retry_after_seconds(header, NOW) == seconds


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "²", "12:00", "Mon, 99 May 2026 12:00:00 GMT"])
def test_anything_else_means_absent(header: str | None) -> None:
    """Missing, negative, fractional, non-ASCII digits or junk: None, so the caller keeps its own schedule."""
    assert retry_after_seconds(header, NOW) is None
