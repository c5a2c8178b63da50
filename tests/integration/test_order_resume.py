"""certd SIGKILLed in the middle of an ACME order, against a real Pebble 2.10 behind the
tests.support.hostile_ca proxy (which counts the orders and finalizations the CA accepted):
the next run resumes the journaled order instead of placing a second one, and nginx serves
the certificate it yields.

Three crash points (``CERTD_CRASH_AT``, certd/engine/orders.py): ``order_created`` — the CA
accepted newOrder, its URL is not journaled (only the intent written before newOrder is: the
next run finds the order in the account's orders list); ``order_journaled`` — the order
exists and is journaled, no challenge answered, not finalized; ``order_finalized`` — the CA
has issued and certd downloaded the chain, but no version is stored. A third
(certd/engine/renew.py): ``version_stored`` — the certificate is stored as a version, and no
rotation journal points to it yet (certd/engine/adopt.py: an orphan).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certd.acme.resume import journal_meta
from certd.crypto.keys import generate_private_key
from certd.store.files import FileStore
from certd.store.port import OrderJournal
from tests.integration.test_faults import DOMAINS, FaultSite, make_site, renew_forced, start
from tests.support.hostile_ca import HostileCA


@pytest.fixture
def sites() -> Iterator[list[FaultSite]]:
    """Sites made by a test; their probers and daemons are stopped after (as in test_faults)."""
    made: list[FaultSite] = []
    yield made
    for site in made:
        site.prober.stop()
        site.env.close()


@pytest.mark.parametrize("point", ["order_created", "order_journaled", "order_finalized"])
def test_certd_killed_mid_order_resumes_it_and_the_ca_sees_one_order(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite], point: str) -> None:
    """Killed mid-order, the next renew finishes that same order: one order and one issuance at the CA, served by nginx."""
    peb = pebble_factory()
    ca = HostileCA(peb, tmp_path).start()
    try:
        site = start(sites, make_site(tmp_path, peb, nginx_factory, directory=ca.directory_url))
        before = site.served()
        orders, issued = len(ca.orders_created), len(ca.finalized)
        cert_dir = site.env.state_dir / "certs" / "www"

        r = site.env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": point})
        assert r.returncode == -9, r.stdout + r.stderr
        assert len(ca.orders_created) == orders + 1
        assert len(ca.finalized) == issued + (1 if point == "order_finalized" else 0)
        assert site.versions() == [1] and site.served().fingerprint_sha256 == before.fingerprint_sha256
        journal_key = (cert_dir / "order.key").read_bytes()
        assert stat.S_IMODE((cert_dir / "order.key").stat().st_mode) == 0o600
        assert (cert_dir / "order.json").exists()

        r, _ = renew_forced(site, check=0)
        assert len(ca.orders_created) == orders + 1, "a second order was placed instead of resuming the first"
        if point == "order_created":  # only the intent was journaled: the account's orders list named the order
            audit = [json.loads(line) for line in (site.env.state_dir / "audit.jsonl").read_text().splitlines()]
            (found,) = [a for a in audit if a["event"] == "order_intent"]
            assert found["outcome"] == "found" and found["detail"]["order"].startswith("https://"), found
        assert len(ca.finalized) == issued + 1
        row = site.stored()
        assert row["version"] == 2 and row["last_result"] == "success", row
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"] != before.fingerprint_sha256
        assert (cert_dir / "versions" / "0002" / "privkey.pem").read_bytes() == journal_key
        assert not (cert_dir / "order.json").exists() and not (cert_dir / "order.key").exists()
        site.assert_invariants()
    finally:
        ca.stop()


@pytest.mark.parametrize("forced", [False, True])
def test_certd_killed_after_storing_the_version_rolls_it_out_next_time_and_the_ca_sees_one_order(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite], forced: bool) -> None:
    """Killed after storing version 2, before its rotation journal: the next renew (scheduled or forced) rolls version 2 out; one order at the CA, nginx serves it."""
    peb = pebble_factory()
    ca = HostileCA(peb, tmp_path).start()
    try:
        site = start(sites, make_site(tmp_path, peb, nginx_factory, directory=ca.directory_url))
        before = site.served()
        orders, issued = len(ca.orders_created), len(ca.finalized)
        cert_dir = site.env.state_dir / "certs" / "www"

        r = site.env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": "version_stored"})
        assert r.returncode == -9, r.stdout + r.stderr
        assert (len(ca.orders_created), len(ca.finalized)) == (orders + 1, issued + 1)
        assert site.versions() == [1, 2] and site.stored()["version"] == 1
        assert site.served().fingerprint_sha256 == before.fingerprint_sha256

        r = site.env.run(*(["renew", "www", "--force"] if forced else ["renew", "www"]), check=0)
        assert "Traceback" not in r.stdout + r.stderr
        assert len(ca.orders_created) == orders + 1, "a second order was placed for one renewal"
        assert len(ca.finalized) == issued + 1
        row = site.stored()
        assert row["version"] == 2 and row["last_result"] == "success", row
        assert site.versions() == [1, 2]
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"] != before.fingerprint_sha256
        assert not (cert_dir / "order.json").exists() and not (cert_dir / "order.key").exists()
        audit = [json.loads(line) for line in (site.env.state_dir / "audit.jsonl").read_text().splitlines()]
        (adopted,) = [a for a in audit if a["event"] == "version_adopted"]
        assert adopted["version"] == 2 and adopted["detail"]["left_at"] == "stored", adopted
        assert [a["version"] for a in audit if a["event"] == "renewed"][-1] == 2
        site.assert_invariants()
    finally:
        ca.stop()


def test_a_journal_for_other_names_is_discarded_and_a_new_order_placed(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """Names changed after a crash mid-order: the journaled order is not resumed; a new order for the new names is issued."""
    peb = pebble_factory()
    ca = HostileCA(peb, tmp_path).start()
    try:
        site = start(sites, make_site(tmp_path, peb, nginx_factory, directory=ca.directory_url))
        orders = len(ca.orders_created)
        r = site.env.run("renew", "www", "--force", env={"CERTD_CRASH_AT": "order_journaled"})
        assert r.returncode == -9, r.stdout + r.stderr
        site.base = {**site.base, "domains": ["www.example.test"]}
        site.configure()
        r, _ = renew_forced(site, check=0)
        assert len(ca.orders_created) == orders + 2
        assert "not resuming order" in r.stdout + r.stderr or "order_discarded" in r.stdout + r.stderr
        row = site.stored()
        assert row["version"] == 2 and row["last_result"] == "success", row
        assert not (site.env.state_dir / "certs" / "www" / "order.json").exists()
    finally:
        ca.stop()


def test_a_journaled_order_pebble_does_not_know_is_discarded_for_one_new_order(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """A journal naming an order the CA never heard of: Pebble's answer discards it, and exactly one new order is issued."""
    peb = pebble_factory()
    ca = HostileCA(peb, tmp_path).start()
    try:
        site = start(sites, make_site(tmp_path, peb, nginx_factory, directory=ca.directory_url))
        store = FileStore(site.env.state_dir)
        with store.lock("www"):
            store.save_order("www", OrderJournal(
                f"https://127.0.0.1:{ca.port}/my-order/not-an-order", generate_private_key("ecdsa-p256"),
                "2026-11-22T11:00:00Z", journal_meta(ca.directory_url, DOMAINS, None)))
        orders = len(ca.orders_created)
        renew_forced(site, check=0)
        assert len(ca.orders_created) == orders + 1
        row = site.stored()
        assert row["version"] == 2 and row["last_result"] == "success", row
        assert store.load_order("www") is None
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"]
    finally:
        ca.stop()
