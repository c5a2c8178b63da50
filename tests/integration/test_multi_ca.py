"""Several CAs with fallback, against two real Pebble instances (one module-wide pair), each behind
the tests.support.hostile_ca proxy, which counts the orders each CA accepted and can rate-limit:

- the first CA stopped: the certificate is issued by the second (``status --json`` says so, the
  audit's ``renewed`` names it and why the first was skipped); the first back: the next renewal
  goes to the first again;
- the first CA refusing the name for good (Pebble's ``domainBlocklist``: ``rejectedIdentifier``):
  issued by the second;
- a required profile only the second CA offers: the first is skipped, the reason logged;
- the first CA rate-limiting beyond the certificate's emergency point: the second; within it:
  certd waits (no order at the second) and then renews at the first once it answers.

Both Pebbles validate http-01 on the same port, so one certd responder serves either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.certd_env import CertdEnv
from tests.support.hostile_ca import HostileCA
from tests.support.pebble_fixtures import PebbleEnv, PebblePorts
from tests.support.procs import free_port, free_tcp_udp_port

REFUSED = "refused.example.test"
VALIDITY = 3600   # one-hour certificates: the emergency point is 6 minutes before expiry
PROFILE = "backuponly"


class TwoCAs:
    def __init__(self, first: PebbleEnv, second: PebbleEnv, proxies: tuple[HostileCA, HostileCA]) -> None:
        self.first, self.second = first, second
        self.primary, self.backup = proxies

    def orders(self) -> tuple[int, int]:
        """The orders each CA accepted so far (primary, backup)."""
        return len(self.primary.orders_created), len(self.backup.orders_created)


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoCAs]:
    first = PebbleEnv(tmp_path_factory.mktemp("pebble-primary"), validity=VALIDITY,
                      config={"domainBlocklist": [REFUSED]})
    started: list[Any] = []
    try:
        started.append(first.start())
        ports = PebblePorts(acme=free_port(), mgmt=free_port(), http=first.ports.http, tls=first.ports.tls,
                            dns=free_tcp_udp_port(), challtestsrv=free_port())
        profiles = {"default": {"description": "certd tests", "validityPeriod": VALIDITY},
                    PROFILE: {"description": "only the backup offers it", "validityPeriod": VALIDITY}}
        second = PebbleEnv(tmp_path_factory.mktemp("pebble-backup"), ports=ports, config={"profiles": profiles})
        started.append(second.start())
        work = tmp_path_factory.mktemp("proxies")
        proxies = (HostileCA(first, work / "a").start(), HostileCA(second, work / "b").start())
        started.extend(proxies)
        yield TwoCAs(first, second, proxies)
    finally:
        for thing in reversed(started):
            thing.stop()


def env_for(tmp_path: Path, cas: TwoCAs, domains: list[str], **cert: Any) -> CertdEnv:
    env = CertdEnv(tmp_path, cas.first)
    env.arrays["ca"] = [
        {"name": "primary", "directory": cas.primary.directory_url, "email": "ops@example.test", "agree_tos": True,
         "ca_bundle": str(cas.first.ca_bundle)},
        {"name": "backup", "directory": cas.backup.directory_url, "email": "ops@example.test", "agree_tos": True,
         "ca_bundle": str(cas.second.ca_bundle)},
    ]
    env.write_config([env.http_cert("www", domains, ca=["primary", "backup"], **cert)])
    return env


def renewed_details(env: CertdEnv) -> list[dict[str, Any]]:
    """The ``detail`` of every ``renewed`` event in the audit log, oldest first."""
    lines = (env.state_dir / "audit.jsonl").read_text().splitlines()
    return [e.get("detail") or {} for e in map(json.loads, lines) if e.get("event") == "renewed"]


def test_a_stopped_first_ca_falls_to_the_second_and_the_next_renewal_returns_to_the_first(
        tmp_path: Path, cas: TwoCAs) -> None:
    """primary stopped: backup issues, status and audit say so; primary back: the next renewal is primary's."""
    env = env_for(tmp_path, cas, ["down.example.test"])
    before = cas.orders()
    cas.first.stop()
    try:
        r = env.run("renew", "--all", check=0)
    finally:
        cas.first.start()
    row = env.status()["www"]
    assert row["ca"] == "backup" and row["version"] == 1, (row, r.stdout)
    assert cas.orders() == (before[0], before[1] + 1)
    assert "ca_skipped name=www ca=primary" in r.stderr
    (detail,) = renewed_details(env)
    assert detail["ca"] == "backup" and detail["ca_skipped"][0]["ca"] == "primary"
    assert "not answering" in detail["ca_skipped"][0]["reason"]

    r = env.run("renew", "www", "--force", check=0)
    row = env.status()["www"]
    assert row["ca"] == "primary" and row["version"] == 2, (row, r.stdout)
    assert cas.orders() == (before[0] + 1, before[1] + 1)


def test_a_first_ca_refusing_the_name_for_good_falls_to_the_second(tmp_path: Path, cas: TwoCAs) -> None:
    """primary answers rejectedIdentifier (blocklisted name): backup issues, the skip says why."""
    env = env_for(tmp_path, cas, [REFUSED])
    before = cas.orders()
    r = env.run("renew", "--all", check=0)
    assert env.status()["www"]["ca"] == "backup", r.stdout
    assert cas.orders() == (before[0], before[1] + 1)
    assert sum(REFUSED.encode() in p for _, p in cas.primary.new_orders) >= 1
    (detail,) = renewed_details(env)
    assert "rejectedIdentifier" in detail["ca_skipped"][0]["reason"]


def test_a_required_profile_the_first_ca_does_not_offer_skips_it(tmp_path: Path, cas: TwoCAs) -> None:
    """profile offered only by backup: primary is skipped without an order, the reason names the profile."""
    env = env_for(tmp_path, cas, ["profiled.example.test"], profile=PROFILE)
    before = cas.orders()
    r = env.run("renew", "--all", check=0)
    row = env.status()["www"]
    assert row["ca"] == "backup" and row["profile"] == PROFILE, (row, r.stdout)
    assert cas.orders() == (before[0], before[1] + 1)
    assert "ca_skipped name=www ca=primary" in r.stderr and f"no profile '{PROFILE}'" in r.stderr


def test_a_rate_limit_beyond_the_emergency_point_falls_over_one_within_it_waits(
        tmp_path: Path, cas: TwoCAs) -> None:
    """Retry-After 2 h on a 1-hour certificate: backup; 30 s: certd waits (no order at backup), then primary again."""
    env = env_for(tmp_path, cas, ["limited.example.test"])
    env.run("renew", "--all", check=0)
    assert env.status()["www"]["ca"] == "primary"
    try:
        cas.primary.rate_limited = 7200
        before = cas.orders()
        r = env.run("renew", "www", "--force", check=0)
        row = env.status()["www"]
        assert row["ca"] == "backup" and row["version"] == 2, (row, r.stdout)
        assert cas.orders() == (before[0], before[1] + 1)

        cas.primary.rate_limited = 30
        before = cas.orders()
        r = env.run("renew", "www", "--force", check=1)
        row = env.status()["www"]
        assert row["state"] == "rate_limited" and row["version"] == 2 and row["ca"] == "backup", row
        assert cas.orders() == before, "within the emergency point: no order at backup"
    finally:
        cas.primary.rate_limited = None
    r = env.run("renew", "www", "--force", check=0)
    row = env.status()["www"]
    assert row["ca"] == "primary" and row["version"] == 3, (row, r.stdout)


def test_the_dns_persist_record_of_the_ca_that_answers_prints_while_the_other_is_down(
        tmp_path: Path, cas: TwoCAs) -> None:
    """dns-persist-record with primary stopped: backup's record is printed, one stderr line names primary, exit 1."""
    env = env_for(tmp_path, cas, ["persist.example.test"])
    both = env.run("dns-persist-record", "www", check=0).stdout
    assert both.count(" IN TXT ") == 2, both  # one per CA: each names its own account
    cas.first.stop()
    try:
        r = env.run("dns-persist-record", "www", check=1)
    finally:
        cas.first.start()
    records = [line for line in r.stdout.splitlines() if " IN TXT " in line]
    assert len(records) == 1 and records[0] in both, r.stdout
    complaints = [line for line in r.stderr.splitlines() if line.startswith("certd: CA ")]
    assert len(complaints) == 1 and complaints[0].startswith("certd: CA primary: no record printed: "), r.stderr
    assert "will retry" not in complaints[0] and "Traceback" not in r.stderr
