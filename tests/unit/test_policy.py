"""The renewal policy: facts + now -> when to renew and why. Fixed times, seeded randomness."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest

from certd.config import RenewBefore
from certd.core.policy import AriWindow, Facts, backoff, decide, is_expiring_soon

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def cert(days: float = 90, start: datetime = T0, **kw) -> Facts:
    return Facts(not_before=start, not_after=start + timedelta(days=days), **kw)


def rng() -> random.Random:
    return random.Random(42)


def test_no_certificate_is_due_now():
    """A certificate never issued is renewed at once."""
    d = decide(Facts(), T0, rng())
    assert d.renew_at == T0 and d.is_due(T0) and "no certificate" in d.reason


def test_first_issuance_failures_back_off_too():
    """With no certificate yet, a failing CA is retried after 2 s, 4 s, 8 s... not at once."""
    for n, expected in ((1, 2), (2, 4), (3, 8), (20, 300)):
        d = decide(Facts(failures=n, last_failure=T0), T0, rng())
        assert timedelta(seconds=expected) <= d.renew_at - T0 <= timedelta(seconds=expected * 1.1)
        assert "no certificate yet; retry" in d.reason


def test_default_renews_with_a_third_of_the_lifetime_left_minus_jitter():
    """A 90-day certificate renews about 30 days before expiry, jittered by at most an hour."""
    f = cert(90)
    d = decide(f, T0, rng())
    nominal = f.not_after - timedelta(days=30)
    assert nominal - timedelta(hours=1) <= d.renew_at <= nominal
    assert "1/3 of lifetime" in d.reason and not d.emergency


def test_short_lived_certificates_renew_at_half_their_lifetime():
    """A certificate shorter than 10 days renews when half its lifetime remains."""
    f = Facts(not_before=T0, not_after=T0 + timedelta(minutes=2))
    d = decide(f, T0, rng())
    assert T0 + timedelta(seconds=60 - 2.4) <= d.renew_at <= T0 + timedelta(seconds=60)
    assert "1/2 of lifetime" in d.reason


@pytest.mark.parametrize("rb,expected_left", [
    (RenewBefore(fraction=Fraction(1, 4)), timedelta(days=22.5)),
    (RenewBefore(duration=timedelta(days=10)), timedelta(days=10)),
])
def test_configured_renew_before_is_honoured(rb, expected_left):
    """renew_before as a fraction or a duration sets the renewal point (minus jitter)."""
    f = cert(90, renew_before=rb)
    d = decide(f, T0, rng())
    nominal = f.not_after - expected_left
    assert nominal - timedelta(hours=1) <= d.renew_at <= nominal


def test_renew_before_longer_than_the_lifetime_does_not_loop():
    """A 30d renew_before on 2-minute certificates falls back to a fraction instead of renewing forever."""
    f = Facts(not_before=T0, not_after=T0 + timedelta(minutes=2), renew_before=RenewBefore(duration=30 * DAY))
    d = decide(f, T0, rng())
    assert d.renew_at > T0 + timedelta(seconds=30)
    assert "exceeds" in d.reason


def test_ari_window_picks_a_point_inside_it():
    """A plausible ARI window wins over the lifetime fraction; the time lies inside the window."""
    w = AriWindow(T0 + 50 * DAY, T0 + 52 * DAY)
    d = decide(cert(90, ari=w), T0, rng())
    assert w.start <= d.renew_at <= w.end and "ARI window" in d.reason


def test_ari_points_are_spread_across_the_window():
    """Different draws land at different instants (RFC 9773 §4.2 load spreading)."""
    w = AriWindow(T0 + 50 * DAY, T0 + 52 * DAY)
    r = random.Random(1)
    times = {decide(cert(90, ari=w), T0, r).renew_at for _ in range(20)}
    assert len(times) == 20


def test_ari_window_in_the_past_means_renew_now():
    """A window that has ended (Pebble's answer after revocation) makes the certificate due now."""
    now = T0 + 5 * DAY
    w = AriWindow(now - timedelta(hours=1), now - timedelta(minutes=30))
    d = decide(cert(90, ari=w), now, rng())
    assert d.renew_at == now and d.is_due(now) and "revoked" in d.reason


def test_ari_window_too_late_is_overridden_by_the_emergency_point():
    """An ARI window past 1/10 of lifetime left loses to the emergency renewal time."""
    f = cert(90, ari=AriWindow(T0 + 86 * DAY, T0 + 87 * DAY))
    d = decide(f, T0, rng())
    assert d.emergency and d.renew_at == f.not_after - timedelta(days=9)


def test_implausible_ari_window_is_ignored_with_the_reason():
    """Pebble's fixed ±24 h window around a 2-minute certificate is ignored, and the log says so."""
    nb, na = T0, T0 + timedelta(minutes=2)
    mid = na - timedelta(seconds=40)
    f = Facts(not_before=nb, not_after=na, ari=AriWindow(mid - DAY, mid + DAY))
    d = decide(f, T0, rng())
    assert nb < d.renew_at <= nb + timedelta(seconds=60)
    assert "ignored" in d.reason


def test_failures_back_off_exponentially():
    """Consecutive failures push the retry out: 60 s, 120 s, 240 s... for a 90-day certificate."""
    f = cert(90)
    delays = [backoff(n, f.not_before, f.not_after, T0 + 60 * DAY, random.Random(0)).total_seconds() for n in (1, 2, 3, 4)]
    for n, delay in enumerate(delays):
        assert 60 * 2 ** n <= delay <= 60 * 2 ** n * 1.1


def test_backoff_is_capped_at_an_hour():
    """However many failures, a 90-day certificate retries at least hourly (a recovered CA is used soon)."""
    f = cert(90)
    d = backoff(50, f.not_before, f.not_after, T0 + 60 * DAY, random.Random(0))
    assert timedelta(hours=1) <= d <= timedelta(hours=1.1)


def test_backoff_never_outlasts_the_certificate():
    """Close to expiry the cap shrinks with the time left, so retries keep coming."""
    f = cert(90)
    failed_at = f.not_after - timedelta(minutes=16)
    d = backoff(50, f.not_before, f.not_after, failed_at, random.Random(0))
    assert d <= timedelta(minutes=2.2)


def test_backoff_for_minute_certificates_is_seconds():
    """A 2-minute certificate retries after about a second, not a minute."""
    d = backoff(1, T0, T0 + timedelta(minutes=2), T0 + timedelta(seconds=60), random.Random(0))
    assert d <= timedelta(seconds=1.1)


def test_decision_after_failure_waits_for_the_backoff():
    """A due certificate that just failed is retried after the backoff, not immediately."""
    f = cert(90)
    now = T0 + 70 * DAY
    failed = Facts(not_before=f.not_before, not_after=f.not_after, failures=3, last_failure=now)
    d = decide(failed, now, rng())
    assert now + timedelta(minutes=4) <= d.renew_at <= now + timedelta(minutes=4.5)
    assert "retry 3" in d.reason


def test_expiring_soon_past_the_emergency_point():
    """Alert-worthy once a tenth of the lifetime remains."""
    f = cert(90)
    assert not is_expiring_soon(f.not_before, f.not_after, f.not_after - timedelta(days=10))
    assert is_expiring_soon(f.not_before, f.not_after, f.not_after - timedelta(days=8))


def test_an_expired_certificate_says_it_expired():
    """Issue 13 item 12: the reason for renewing an expired certificate is that it expired,
    not "1/2 of lifetime left"."""
    f = cert(1)
    d = decide(f, T0 + 2 * DAY, rng())
    assert d.renew_at == T0 + 2 * DAY and d.reason == "the certificate expired at 2026-11-02T00:00:00Z"


def test_a_window_spanning_the_whole_lifetime_is_drawn_before_the_safety_point():
    """Pebble 2.10 offers a short certificate's whole lifetime as its ARI window. A draw in the
    last tenth would start the rotation at the emergency point with no time left to finish it
    (the 3-minute soak served 29 certificates past it): every draw of a short certificate lands
    before 1/3 of its lifetime is left, a long one's before 1/5."""
    nb, na = T0, T0 + timedelta(minutes=3)
    f = Facts(not_before=nb, not_after=na, ari=AriWindow(nb, na))
    r = random.Random(7)
    draws = [decide(f, T0, r) for _ in range(2000)]
    assert all(nb <= d.renew_at <= na - timedelta(seconds=60) and not d.emergency for d in draws)
    assert max(d.renew_at for d in draws) > na - timedelta(seconds=64)   # still spread to the cut
    assert "before 1/3 of lifetime left" in draws[0].reason
    long = cert(90, ari=AriWindow(T0, T0 + 90 * DAY))
    draws = [decide(long, T0, r) for _ in range(2000)]
    assert all(d.renew_at <= T0 + 72 * DAY for d in draws) and max(d.renew_at for d in draws) > T0 + 71 * DAY
    assert "before 1/5 of lifetime left" in draws[0].reason


def test_a_window_starting_between_the_safety_and_emergency_points_renews_at_its_start():
    f = cert(90, ari=AriWindow(T0 + 75 * DAY, T0 + 89 * DAY))
    d = decide(f, T0, rng())
    assert d.renew_at == T0 + 75 * DAY and not d.emergency
