"""A change feed built by polling (the :class:`~certd.store.port.ChangeFeed` contract for stores
that cannot notify: files). A subscription remembers the desired version it last reported
for every certificate and, on each call, reports those whose desired version differs now.
Coalesced by construction: only the latest version is ever seen, which is all the contract
promises (and all a reconcile loop needs)."""

from __future__ import annotations

from collections.abc import Callable, Collection

from certd.core.clock import Clock
from certd.store.port import DesiredChange

POLL_INTERVAL = 1.0  # seconds between looks while waiting: one readlink per certificate


class PollingSubscription:
    """Changes of ``desired(name)`` for ``names`` (every name ``listing()`` returns when None)."""

    def __init__(self, desired: Callable[[str], int | None], listing: Callable[[], list[str]],
                 clock: Clock, names: Collection[str] | None = None, interval: float = POLL_INTERVAL) -> None:
        self._desired = desired
        self._listing = listing
        self._clock = clock
        self._names = None if names is None else tuple(names)
        self._interval = interval
        self._seen = self._look()  # changes are those made after subscribing
        self._closed = False

    def _look(self) -> dict[str, int | None]:
        names = self._listing() if self._names is None else self._names
        return {n: self._desired(n) for n in names}

    def changes(self, timeout: float = 0.0) -> list[DesiredChange]:
        """Certificates whose desired version changed since the previous call, waiting up to
        ``timeout`` seconds (of the clock) for at least one; [] once closed."""
        deadline = self._clock.monotonic() + timeout
        while not self._closed:
            now = self._look()
            found = [DesiredChange(n, v) for n, v in sorted(now.items()) if self._seen.get(n) != v]
            found += [DesiredChange(n, None) for n in sorted(set(self._seen) - set(now)) if self._seen[n] is not None]
            self._seen = now
            left = deadline - self._clock.monotonic()
            if found or left <= 0:
                return found
            self._clock.sleep(min(self._interval, left))
        return []

    def close(self) -> None:
        self._closed = True
