"""Planner: status rows and plans come from a cache that never outlives what it was built from."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from certd.core import policy
from certd.core.clock import FakeClock
from certd.config import AcmeConfig, CertificateConfig, Config, DaemonConfig
from certd.engine.manager import Manager
from certd.engine.planning import CertState
from certd.store.files import FileStore
from tests.support.certs import make_bundle

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def make(tmp_path: Path, clock: FakeClock) -> Manager:
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), (CertificateConfig("www", ("www.example.test",)),))
    return Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=clock)


def add(manager: Manager, days: float) -> str:
    bundle = make_bundle(("www.example.test",), not_before=NOW, days=days)
    manager.store.set_current("www", manager.store.add_version("www", bundle, {}))
    return bundle.info.serial


def status(m: Manager, cert: CertificateConfig) -> dict[str, Any]:
    """The status row, checked against the daemon's cached JSON text of it (with a next_run)."""
    row = m.status(cert)
    assert json.loads(m.status_json(cert)) == row
    assert json.loads(m.status_json(cert, "2026-11-22T13:00:00Z")) == {**row, "next_run": "2026-11-22T13:00:00Z"}
    assert [json.loads(r) for r in m.listing_json([cert], {"www": "2026-11-22T13:00:00Z"})] == \
        [{**row, "next_run": "2026-11-22T13:00:00Z"}]  # the daemon's whole listing
    return row


def test_status_follows_every_store_change_and_the_clock(tmp_path: Path) -> None:
    """A new version, a failure, a revocation mark and time passing each show at once."""
    clock = FakeClock(NOW)
    m = make(tmp_path, clock)
    cert = m.config.certificates[0]
    assert status(m, cert)["state"] == "missing"
    first = add(m, days=9)
    row = status(m, cert)
    assert (row["serial"], row["state"], row["version"]) == (first, "ok", 1)
    assert status(m, cert) == row  # the cached row, unchanged

    m.save_state("www", CertState(failures=2, last_error="CA not reachable"))
    assert (status(m, cert)["state"], status(m, cert)["failures"]) == ("failing", 2)
    m.save_state("www", CertState())

    second = add(m, days=9)
    assert (status(m, cert)["serial"], status(m, cert)["version"]) == (second, 2)

    m.store.update_meta("www", 2, {"revoked": {"reason": "superseded"}})
    assert status(m, cert)["state"] == "revoked"
    m.store.update_meta("www", 2, {"revoked": None})

    renew_at = datetime.fromisoformat(status(m, cert)["next_renewal"].replace("Z", "+00:00"))
    clock.advance(renew_at - clock.now() + timedelta(seconds=1))  # due: decided again, not cached
    assert m.plan(cert)[0] <= clock.now()
    clock.advance(policy.expiring_at(NOW, NOW + timedelta(days=9)) - clock.now())
    assert status(m, cert)["state"] == "expiring"
    clock.advance(NOW + timedelta(days=9, seconds=1) - clock.now())
    assert status(m, cert)["state"] == "expired"


def test_an_equal_configuration_after_a_reload_keeps_the_cache_and_a_changed_one_does_not(tmp_path: Path) -> None:
    """A reload makes new certificate objects: equal ones reuse the facts, changed domains re-decide."""
    clock = FakeClock(NOW)
    m = make(tmp_path, clock)
    add(m, days=30)
    before = m.plan(m.config.certificates[0])
    same = CertificateConfig("www", ("www.example.test",))
    assert m.plan(same) == before
    changed = CertificateConfig("www", ("www.example.test", "api.example.test"))
    when, why = m.plan(changed)
    assert when == clock.now() and "differ" in why


def test_the_listing_trusts_this_processs_writes_and_sees_a_hand_edit_at_the_recheck(tmp_path: Path) -> None:
    """The daemon's whole listing asks no change token while the facts are current since this
    process's last write of the certificate (any FileStore of it on the directory): a version
    written shows at once; a hand edit, once recheck() (the daemon's every few minutes) looked."""
    clock = FakeClock(NOW)
    m = make(tmp_path, clock)
    cert = m.config.certificates[0]
    first = add(m, days=30)

    def listing() -> dict[str, Any]:
        row: dict[str, Any] = json.loads(next(m.listing_json([cert], {})))
        return row

    assert (listing()["serial"], listing()["version"]) == (first, 1)
    asked: list[str] = []
    token = m.store.change_token
    m.store.change_token = lambda name: asked.append(name) or token(name)  # type: ignore[method-assign]
    assert listing()["serial"] == first and asked == []  # trusted: no syscalls for this row
    renew_at = datetime.fromisoformat(listing()["next_renewal"].replace("Z", "+00:00"))
    clock.advance(renew_at - clock.now() + timedelta(days=1))  # due: plan() would gather afresh
    assert (listing()["serial"], listing()["state"], asked) == (first, "ok", [])  # the listing need not
    clock.advance(timedelta(days=9))
    assert (listing()["state"], asked) == ("expiring", [])  # the state is worked out at now all the same

    other = FileStore(m.config.daemon.state_dir)  # another part of this process (housekeeping, a rollback)
    second = make_bundle(("www.example.test",), not_before=NOW, days=30)
    other.set_current("www", other.add_version("www", second, {}))
    assert (listing()["serial"], listing()["version"]) == (second.info.serial, 2)  # at once

    link = tmp_path / "state" / "certs" / "www" / "current"  # by hand: back to version 1
    (tmp_path / "state" / "certs" / "www" / "hand").symlink_to("versions/0001")
    (tmp_path / "state" / "certs" / "www" / "hand").replace(link)
    assert listing()["version"] == 2  # not seen yet: nothing of this process wrote it
    m.recheck([cert])
    assert (listing()["serial"], listing()["version"]) == (first, 1)

    (tmp_path / "state" / "certs" / "www" / "hand").symlink_to("versions/0002")
    (tmp_path / "state" / "certs" / "www" / "hand").replace(link)
    assert m.status(cert)["version"] == 2  # a row named (certd status NAME) checks the store each time


def test_a_hand_edit_certd_cannot_read_breaks_that_certificate_and_the_recheck_goes_on(tmp_path: Path) -> None:
    """A state.json edited by hand into something certd cannot read (a timestamp "yesterday")
    shows that certificate as broken, saying what; the recheck still finds the next one's edit."""
    clock = FakeClock(NOW)
    certs = (CertificateConfig("aaa", ("aaa.example.test",)), CertificateConfig("bbb", ("bbb.example.test",)))
    cfg = Config(tmp_path / "certd.toml", DaemonConfig(state_dir=tmp_path / "state"),
                 AcmeConfig("https://127.0.0.1:14000/dir"), certs)
    m = Manager(cfg, store=FileStore(cfg.daemon.state_dir), clock=clock)
    for c in certs:
        m.store.set_current(c.name, m.store.add_version(c.name, make_bundle(c.domains, not_before=NOW, days=30), {}))
    assert [json.loads(r)["state"] for r in m.listing_json(list(certs), {})] == ["ok", "ok"]
    (tmp_path / "state" / "certs" / "aaa" / "state.json").write_text('{"failures": 1, "last_failure": "yesterday"}')
    (tmp_path / "state" / "certs" / "bbb" / "state.json").write_text('{"failures": 3, "last_error": "by hand"}')
    m.recheck(list(certs))
    aaa, bbb = (json.loads(r) for r in m.listing_json(list(certs), {}))
    assert aaa["state"] == "broken" and "yesterday" in aaa["broken_reason"] and "fix or remove" in aaa["broken_reason"]
    assert (bbb["state"], bbb["failures"]) == ("failing", 3)
    assert m.status(certs[0])["state"] == "broken"  # status NAME: the same, not a traceback
