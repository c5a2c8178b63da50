"""The daemon's scheduled renewals while the fleet's database is down: put off, said once, never run."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.core.clock import FakeClock, isoformat
from certd.core.events import EventBus
from certd.daemon.jobs import STORE_DOWN_RETRY, Jobs
from certd.daemon.scheduler import Flights, Scheduler
from certd.daemon.systemd import StateTracker
from certd.engine.manager import Manager
from certd.store.files import FileStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def test_a_scheduled_look_is_put_off_while_the_store_probe_says_down(tmp_path: Path, caplog) -> None:
    """Store down: no flight starts, the look is rescheduled STORE_DOWN_RETRY later, the skip logged once."""
    clock = FakeClock(NOW)
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CertificateConfig("www", ("www.example.test",)),))
    manager = Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=clock, events=EventBus())
    flights = Flights(clock)
    scheduler = Scheduler(1, lambda name: None, clock)
    tracker = StateTracker(lambda: cfg, manager.load_state, scheduler, clock)
    jobs = Jobs(lambda: cfg, manager, flights, scheduler, tracker, threading.Event())
    jobs.store_up = lambda: False
    jobs.scheduled("www")
    jobs.scheduled("www")
    assert not flights.in_progress()
    assert scheduler.next_runs()["www"] == isoformat(NOW + timedelta(seconds=STORE_DOWN_RETRY))
    assert caplog.text.count("scheduled_renewals_skipped") == 1
