"""ACME profiles (draft-ietf-acme-profiles) against real Pebble 2.10, configured like Let's
Encrypt: ``classic`` (90 days), ``tlsserver`` (45 days) and ``shortlived`` (160 hours). What is
checked is the lifetime of the certificate the CA actually issued. Pebble picks a *random*
profile for an order that names none, so "the CA's default" is tested on a Pebble offering one."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.certd_env import CertdEnv

SNI = "www.example.test"


def lifetime_hours(row: dict[str, Any]) -> float:
    return (datetime.fromisoformat(row["not_after"]) - datetime.fromisoformat(row["not_before"])).total_seconds() / 3600


LETS_ENCRYPT_LIKE = {"classic": {"description": "90 days", "validityPeriod": 90 * 86400},
                     "tlsserver": {"description": "45 days", "validityPeriod": 45 * 86400},
                     "shortlived": {"description": "160 hours", "validityPeriod": 160 * 3600}}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One Pebble offering Let's Encrypt's three profiles, shared by this module's tests."""
    from tests.support.pebble_fixtures import PebbleEnv
    env = PebbleEnv(tmp_path_factory.mktemp("pebble-profiles"), config={"profiles": LETS_ENCRYPT_LIKE})
    try:
        yield env.start()
    finally:
        env.stop()


def env_with(tmp_path: Path, pebble: Any, **cert: Any) -> CertdEnv:
    env = CertdEnv(tmp_path, pebble)
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live")}, **cert)])
    return env


def test_a_required_profile_gets_its_lifetime_and_is_recorded(tmp_path: Path, profiled: Any) -> None:
    """profile = "shortlived" orders with it: a 160-hour certificate, shown by status and in the audit."""
    assert sorted(profiled.directory()["meta"]["profiles"]) == ["classic", "shortlived", "tlsserver"]
    env = env_with(tmp_path, profiled, profile="shortlived")
    env.run("renew", "--all", check=0)
    row = env.status("www")["www"]
    assert 159 <= lifetime_hours(row) <= 160.1 and row["profile"] == "shortlived"
    issued = [r for r in json.loads(env.run("history", "www", "--json", check=0).stdout)["records"]
              if r["event"] == "issued"]
    assert issued and issued[-1]["detail"]["profile"] == "shortlived"


def test_a_required_profile_the_ca_lacks_is_held_naming_what_it_offers(tmp_path: Path, profiled: Any) -> None:
    """A profile the CA does not offer fails before any order with one line listing the offer,
    and the certificate is held rather than retried on the short backoff."""
    env = env_with(tmp_path, profiled, profile="bespoke")
    r = env.run("renew", "--all", check=1)
    out = r.stdout + r.stderr
    assert "offers no profile 'bespoke'" in out and "classic, shortlived, tlsserver" in out
    row = env.status("www")["www"]
    assert row["version"] is None and row["state"] == "held" and row["problem"] == "invalidProfile"


def test_a_preferred_profile_is_used_when_offered(tmp_path: Path, profiled: Any) -> None:
    """preferred_profile = "tlsserver" on a CA offering it: a 45-day certificate."""
    env = env_with(tmp_path, profiled, preferred_profile="tlsserver")
    env.run("renew", "--all", check=0)
    row = env.status("www")["www"]
    assert round(lifetime_hours(row) / 24) == 45 and row["profile"] == "tlsserver"


def test_a_preferred_profile_not_offered_falls_back_to_the_default(tmp_path: Path, pebble_factory: Any) -> None:
    """preferred_profile on a CA without it: the order names no profile and the CA's default
    (here its only profile, 90 days) is issued; status shows no profile."""
    ca = pebble_factory(config={"profiles": {"classic": LETS_ENCRYPT_LIKE["classic"]}})
    env = env_with(tmp_path, ca, preferred_profile="tlsserver")
    env.run("renew", "--all", check=0)
    row = env.status("www")["www"]
    assert round(lifetime_hours(row) / 24) == 90 and row["profile"] is None
