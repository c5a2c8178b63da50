"""Playing by the CA's rules, against a real Pebble 2.10 (real validation) behind the
tests.support.hostile_ca proxy, which counts orders and answers what Pebble cannot be made to:

- a name on Pebble's ``domainBlocklist`` (``rejectedIdentifier``, a permanent refusal) under
  ``certd run``: one order, then the certificate is ``held``, its status saying why, when the
  next try is and how to try now — while a rate-limited certificate in the same daemon waits
  out ``Retry-After`` and is then issued, and one whose name resolves where nothing listens
  (Pebble's validation fails with ``connection``) is ordered again 30 s later, then held 20 min;
- 90 % of nonces rejected: ``renew --all`` of 5 certificates still succeeds;
- an account registration whose answer was lost (the CA knows the key, the state has a stale
  account URL) heals on the next renewal;
- a CA refusing ``replaces`` (403): the renewal goes through without it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import josepy as jose
from acme import client as acme_client
from acme import messages
from cryptography.hazmat.primitives import serialization

from tests.support.certd_env import CertdEnv
from tests.support.hostile_ca import HostileCA
from tests.support.procs import wait_until

BLOCKED = "blocked.example.test"
LIMITED = "limited.example.test"
UNREACHABLE = "unreachable.example.test"   # resolves to 127.0.0.2: the responder is on 127.0.0.1
RETRY_AFTER = 30
FIRST_RETRY = 30  # certd.core.retry.FIRST_RETRY: a first `connection` failure is retried after it
WATCH = 60.0   # seconds the daemon runs with the refused certificate


def orders_for(ca: HostileCA, name: str) -> list[float]:
    return [t for t, payload in ca.new_orders if name.encode() in payload]


def test_a_refused_name_is_held_and_a_rate_limited_one_waits_for_retry_after(
        tmp_path: Path, pebble_factory: Any) -> None:
    """One daemon, three certificates: the blocklisted one gets exactly one order in a minute and
    says held / why / what to do; the rate-limited one places no order before Retry-After,
    then is issued; the one Pebble cannot connect to (`connection`, as when the node answering
    the CA's validation is killed) is ordered again 30 s later, not 20 min, and the second
    `connection` in a row holds it 20 min."""
    peb = pebble_factory(config={"domainBlocklist": [BLOCKED]})
    ca = HostileCA(peb, tmp_path).start()
    ca.rate_limited, ca.rate_limited_name, ca.rate_limited_count = RETRY_AFTER, LIMITED, 1
    env = CertdEnv(tmp_path, peb)
    env.acme_extra["directory"] = ca.directory_url
    peb.add_a(UNREACHABLE, ["127.0.0.2"])
    env.write_config([env.http_cert("blocked", [BLOCKED]), env.http_cert("limited", [LIMITED]),
                      env.http_cert("unreachable", [UNREACHABLE])])
    try:
        daemon = env.start_daemon()
        started = time.monotonic()
        wait_until(lambda: orders_for(ca, BLOCKED) and orders_for(ca, LIMITED), timeout=20,
                   what="the first order of each certificate")
        wait_until(lambda: env.status()["limited"]["state"] == "rate_limited", timeout=10,
                   what="limited shown as rate_limited")
        rows = env.status()
        assert rows["blocked"]["state"] == "held", rows["blocked"]
        assert rows["blocked"]["problem"] == "rejectedIdentifier" and rows["blocked"]["retry_after"]
        assert rows["limited"]["retry_after"] and rows["limited"]["problem"] == "rateLimited"
        assert "not retrying" not in str(rows) and "rejectedIdentifier" in rows["blocked"]["last_error"]

        table = env.run("status", check=0).stdout
        line = next(x for x in table.splitlines() if x.startswith("blocked: "))
        assert "next try at" in line and "certd renew --force blocked" in line and "not retrying" not in table

        wait_until(lambda: env.status()["limited"]["version"] == 1, timeout=RETRY_AFTER + 20,
                   what="limited issued after Retry-After")
        first, second = orders_for(ca, LIMITED)[:2]
        assert second - first >= RETRY_AFTER - 0.5, (first, second)

        wait_until(lambda: len(orders_for(ca, UNREACHABLE)) >= 2 and env.status()["unreachable"]["failures"] >= 2,
                   timeout=FIRST_RETRY + 20, what="unreachable ordered again after its first connection failure")
        first, second = orders_for(ca, UNREACHABLE)[:2]
        assert FIRST_RETRY - 0.5 <= second - first < FIRST_RETRY + 15, (first, second)
        row = env.status()["unreachable"]
        assert (row["state"], row["problem"]) == ("held", "connection"), row
        held_for = dt.datetime.fromisoformat(row["retry_after"].replace("Z", "+00:00")) - dt.datetime.now(dt.timezone.utc)
        assert dt.timedelta(minutes=19) < held_for <= dt.timedelta(minutes=20, seconds=1), row  # to the second
        audit = [json.loads(x) for x in (env.state_dir / "audit.jsonl").read_text().splitlines()]
        failed = [r["detail"] for r in audit if r["event"] == "renewal_failed" and r["name"] == "unreachable"]
        assert [(d.get("problem"), d.get("where")) for d in failed] == [("connection", "challenge")] * 2, failed

        wait_until(lambda: time.monotonic() - started >= WATCH, timeout=WATCH + 5, what="a minute of certd run")
        assert len(orders_for(ca, BLOCKED)) == 1, ca.new_orders
        assert len(orders_for(ca, UNREACHABLE)) == 2, ca.new_orders
        assert env.status()["blocked"]["state"] == "held"
        metrics_ok = daemon.alive
        daemon.stop(timeout=30)
        assert metrics_ok and daemon.returncode == 0
    finally:
        env.close()
        ca.stop()


def test_renew_all_survives_ninety_percent_bad_nonces(tmp_path: Path, pebble_factory: Any) -> None:
    """PEBBLE_WFE_NONCEREJECT=90: every request needs ~10 tries; all 5 certificates are issued,
    and the one-shot CLI never claims it "will retry"."""
    peb = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "90"})
    env = CertdEnv(tmp_path, peb)
    env.write_config([env.http_cert(f"n{i}", [f"n{i}.example.test"]) for i in range(5)])
    r = env.run("renew", "--all", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = env.status()
    assert all(rows[f"n{i}"]["version"] == 1 for i in range(5)), rows
    assert "will retry" not in r.stdout + r.stderr


def test_an_interrupted_registration_heals_on_the_next_renewal(tmp_path: Path, pebble_factory: Any) -> None:
    """The CA forgot the account (restart); certd's registration of the same key reached the
    CA but its answer was never saved: the state has a stale account URL and the CA answers
    the next newAccount with 200 + Location. The next renewal adopts that account."""
    peb = pebble_factory()
    env = CertdEnv(tmp_path, peb)
    env.write_config([env.http_cert("www", ["www.example.test"])])
    env.run("renew", "--all", check=0)
    peb.restart()                                           # the CA forgets every account
    (key_file,) = (env.state_dir / "accounts").glob("*/key.pem")
    stale = next(key_file.parent.glob("account.json")).read_text()
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    net = acme_client.ClientNetwork(jose.JWKEC(key=key), alg=jose.ES256, verify_ssl=str(peb.ca_bundle))
    directory = acme_client.ClientV2.get_directory(peb.directory_url, net)
    acme_client.ClientV2(directory, net).new_account(
        messages.NewRegistration.from_data(email="ops@example.test", terms_of_service_agreed=True))

    r = env.run("renew", "www", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert env.status()["www"]["version"] == 2
    healed = (key_file.parent / "account.json").read_text()
    assert healed != stale                                   # the adopted URL was saved
    env.run("renew", "www", "--force", check=0)              # and works without another repair


def test_a_ca_refusing_replaces_still_renews(tmp_path: Path, pebble: Any) -> None:
    """403 unauthorized on a newOrder with replaces (RFC 9773 §5): ordered again without it."""
    ca = HostileCA(pebble, tmp_path).start()
    try:
        env = CertdEnv(tmp_path, pebble)
        env.acme_extra["directory"] = ca.directory_url
        env.write_config([env.http_cert("www", ["swap.example.test"])])
        env.run("renew", "--all", check=0)
        ca.refuse_replaces = True
        before = len(ca.new_orders)
        r = env.run("renew", "www", "--force", check=0)
        assert env.status()["www"]["version"] == 2, r.stdout
        sent = [payload for _, payload in ca.new_orders[before:]]
        assert len(sent) == 2 and b"\"replaces\"" in sent[0] and b"\"replaces\"" not in sent[1]
    finally:
        ca.stop()
