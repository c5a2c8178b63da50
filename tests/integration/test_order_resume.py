"""certd SIGKILLed in the middle of an ACME order, against a real Pebble 2.10 behind the
tests.support.hostile_ca proxy (which counts the orders and finalizations the CA accepted):
the next run resumes the journaled order instead of placing a second one, and nginx serves
the certificate it yields.

Two crash points (``CERTD_CRASH_AT``, certd/engine/orders.py): ``order_journaled`` — the order
exists and is journaled, no challenge answered, not finalized; ``order_finalized`` — the CA
has issued and certd downloaded the chain, but no version is stored.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_faults import make_site, renew_forced, sites, start  # noqa: F401 (sites: fixture)
from tests.support.hostile_ca import HostileCA


@pytest.mark.parametrize("point", ["order_journaled", "order_finalized"])
def test_certd_killed_mid_order_resumes_it_and_the_ca_sees_one_order(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[Any], point: str) -> None:
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
        assert len(ca.finalized) == issued + 1
        row = site.stored()
        assert row["version"] == 2 and row["last_result"] == "success", row
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"] != before.fingerprint_sha256
        assert (cert_dir / "versions" / "0002" / "privkey.pem").read_bytes() == journal_key
        assert not (cert_dir / "order.json").exists() and not (cert_dir / "order.key").exists()
        site.assert_invariants()
    finally:
        ca.stop()


def test_a_journal_for_other_names_is_discarded_and_a_new_order_placed(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[Any]) -> None:
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
