"""The one parser of the HTTP ``Retry-After`` field (RFC 9110 §10.2.3), for every client in
certd that honours it: the ACME transport (rateLimited problems, order polls, ARI) and the
alert webhooks.

``Retry-After = HTTP-date / delay-seconds``: a number of seconds (ASCII digits only), or a
date in any of the three HTTP-date forms (IMF-fixdate, the obsolete RFC 850 form, asctime),
which is always UTC. Pure: the caller passes ``now``.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import parsedate_to_datetime

from certd.core.clock import utc

_DELAY_SECONDS = re.compile(r"[0-9]+")  # not str.isdigit(): that also accepts "²" and "٣"


def retry_after_seconds(header: str | None, now: datetime) -> float | None:
    """Seconds from ``now`` that ``header`` asks a client to wait: delay-seconds as given, an
    HTTP-date as the time left until it (0 when it has passed). None when the field is absent,
    empty or unreadable — the caller then uses its own schedule."""
    if not header:
        return None
    value = header.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, (utc(when) - now).total_seconds())  # asctime dates parse naive: UTC by definition
