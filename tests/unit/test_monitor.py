"""The daemon's monitor: expiring_soon once per serial, surviving a restart; which files it watches."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from watchdog.observers import Observer

from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig, DeployConfig, FileTarget
from certd.core.events import EventBus, LifecycleEvent
from certd.engine.manager import Manager
from certd.engine.planning import CertState
from certd.daemon.monitor import Monitor, _Owners
from certd.store.files import FileStore
from tests.support.certs import make_bundle

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def make(tmp_path: Path, clock: FakeClock) -> tuple[Monitor, Manager, Config, list[LifecycleEvent]]:
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CertificateConfig("www", ("www.example.test",)),))
    seen: list[LifecycleEvent] = []
    bus = EventBus()
    bus.subscribe(seen.append)
    manager = Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=clock, events=bus)
    monitor = Monitor(manager, lambda: cfg, busy=lambda name: False, submit=lambda *a, **k: None,
                      metrics=None, clock=clock)
    return monitor, manager, cfg, seen


def store(manager: Manager, days: float = 10) -> str:
    bundle = make_bundle(("www.example.test",), not_before=NOW, days=days)
    manager.store.set_current("www", manager.store.add_version("www", bundle, {}))
    return bundle.info.serial


def test_expiring_soon_once_per_serial_and_not_again_after_a_restart(tmp_path):
    """Past a tenth of its lifetime left and not renewed: one event for that serial, none on restart."""
    clock = FakeClock(NOW)
    monitor, manager, cfg, seen = make(tmp_path, clock)
    serial = store(manager)
    manager.save_state("www", CertState(failures=3, last_error="CA not reachable"))
    wait = monitor.check_expiring(cfg)
    assert wait is not None and abs(wait - timedelta(days=9).total_seconds()) < 1  # wakes at the emergency point
    assert not seen
    clock.advance(timedelta(days=9, seconds=1))
    assert monitor.check_expiring(cfg) is None
    (ev,) = seen
    assert ev.kind == "expiring_soon" and ev.old_serial == serial and ev.not_after == NOW + timedelta(days=10)
    assert "3 failed renewal attempts, last: CA not reachable" in ev.reason
    monitor.check_expiring(cfg)
    again, _, _, seen_again = make(tmp_path, clock)  # a restarted daemon
    again.check_expiring(cfg)
    assert len(seen) == 1 and not seen_again


def test_a_renewed_certificate_is_watched_afresh(tmp_path):
    """A new serial gets its own expiring_soon when it, too, runs late."""
    clock = FakeClock(NOW)
    monitor, manager, cfg, seen = make(tmp_path, clock)
    store(manager)
    clock.advance(timedelta(days=9, hours=12))
    monitor.check_expiring(cfg)
    second = store(manager, days=9.6)  # issued at NOW too: already past its own emergency point
    monitor.check_expiring(cfg)
    assert [e.old_serial for e in seen][-1] == second and len(seen) == 2


def test_only_the_certificates_own_files_trigger_a_check(tmp_path: Path):
    """Its link, version files and staged copies concern it; a neighbour's files do not."""
    cert = CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(
        live_dir=tmp_path / "ssl" / "www", combined=tmp_path / "haproxy" / "www.pem",
        files=(FileTarget(tmp_path / "app" / "tls.key", "privkey"),)))
    yes = [tmp_path / "ssl" / "www", tmp_path / "ssl" / ".www.versions" / "0002" / "privkey.pem",
           tmp_path / "haproxy" / "www.pem", tmp_path / "haproxy" / ".www.pem.certd-0002", tmp_path / "app" / "tls.key"]
    no = [tmp_path / "ssl" / "api", tmp_path / "ssl" / ".api.versions" / "0001" / "cert.pem",
          tmp_path / "haproxy" / "api.pem", tmp_path / "app" / "other.key"]
    owners = _Owners(Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                            AcmeConfig("https://127.0.0.1:14000/dir"), (cert,)))
    assert all(owners.of(str(p)) == {"www"} for p in yes)
    assert not any(owners.of(str(p)) for p in no)
    assert owners.of(str(tmp_path / "ssl" / ".www.versions") + "/") == {"www"}  # however it is spelled


def _inotify_watches() -> int:
    """inotify watches this process holds now (every instance), from /proc/self/fdinfo."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def test_a_live_dir_costs_three_inotify_watches_whatever_the_versions_kept(tmp_path: Path):
    """Its directory, .NAME.versions and the live version: no watch per kept version, moved on a switch."""
    live = tmp_path / "ssl" / "www"
    root = live.parent / ".www.versions"
    for v in range(1, 7):
        (root / f"{v:04d}").mkdir(parents=True)
        (root / f"{v:04d}" / "cert.pem").write_text("x")
    live.symlink_to(".www.versions/0006")
    cert = CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(live_dir=live))
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (cert,))
    monitor, _, _, _ = make(tmp_path, FakeClock(NOW))
    monitor._observer = Observer()
    monitor._observer.daemon = True
    monitor._observer.start()
    try:
        before = _inotify_watches()
        monitor._sync_watches(cfg)
        assert _inotify_watches() - before == 3
        assert {p for p, _ in monitor._watches} == {str(live.parent), str(root), str(root / "0006")}
        os.replace(_relink(live, ".www.versions/0005"), live)  # a switch back
        monitor._sync_watches(cfg)
        assert _inotify_watches() - before == 3
        assert str(root / "0005") in {p for p, _ in monitor._watches}
    finally:
        monitor._observer.stop()


def _relink(link: Path, target: str) -> Path:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.symlink_to(target)
    return tmp


def test_drift_is_not_checked_while_the_fleet_database_is_down(tmp_path, caplog):
    """Store probe down: no drift_found (an unreachable store is no drift), one skip line; up: checked again."""
    clock = FakeClock(NOW)
    monitor, manager, cfg, seen = make(tmp_path, clock)
    cfg = dataclasses.replace(cfg, certificates=(CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(
        live_dir=tmp_path / "ssl" / "www")),))
    store(manager)  # stored, never deployed: a drift once the check runs
    up = [False]
    monitor.store_up = lambda: up[0]
    monitor._reconcile(cfg, {"www"}, True)
    monitor._reconcile(cfg, {"www"}, True)
    assert not seen
    assert caplog.text.count("drift_check_skipped") == 1
    up[0] = True
    monitor._reconcile(cfg, {"www"}, True)
    assert [e.kind for e in seen] == ["drift_found"]


class UnreachableStore:
    """A fleet store whose database does not answer (every read: StoreUnreachable)."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise StoreUnreachable("PostgreSQL store: database unreachable: no connection within 5 s")
        return fail


def test_an_unreachable_store_is_not_a_drift(tmp_path):
    """A drift check that cannot reach the fleet's database reports no mismatch, only why it did not check."""
    from certd.verify import drift
    result = drift.check(CertificateConfig("www", ("www.example.test",)), UnreachableStore())
    assert result.clean and "database unreachable" in (result.note or "")
