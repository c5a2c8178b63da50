"""`certd renew --dry-run` against real Pebble as the staging CA: a full order with real http-01
validation and the pre-store checks, and afterwards nothing stored, deployed or counted as a
renewal. The production directory is a loopback port nobody listens on: a dry run that reached
it would fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.certd_env import CertdEnv
from tests.support.procs import free_port

SNI = "www.example.test"


def staged(tmp_path: Path, pebble: Any, **acme: Any) -> CertdEnv:
    env = CertdEnv(tmp_path, pebble)
    env.acme_extra = {"directory": f"https://127.0.0.1:{free_port()}/dir", **acme}
    env.write_config([env.http_cert("www", [SNI], deploy={"live_dir": str(tmp_path / "live" / "www")})])
    return env


def nothing_changed(env: CertdEnv) -> None:
    row = env.status("www")["www"]
    assert row["version"] is None and row["failures"] == 0 and row["last_result"] is None
    assert not (env.dir / "live").exists()
    events = [r["event"] for r in json.loads(env.run("history", "--json", check=0).stdout)["records"]]
    assert "issued" not in events and "renewed" not in events


def test_a_dry_run_orders_from_staging_and_stores_nothing(tmp_path: Path, pebble: Any) -> None:
    """The order is placed and validated on the staging CA, the chain checked, and the state,
    deploy targets and renewal history stay as they were; the audit log records the dry run."""
    env = staged(tmp_path, pebble, staging_directory=pebble.directory_url)
    r = env.run("renew", "--dry-run", "www", "--reason", "new config", check=0)
    assert f"www: dry run OK against {pebble.directory_url}: would store serial" in r.stdout
    nothing_changed(env)
    records = json.loads(env.run("history", "www", "--json", check=0).stdout)["records"]
    assert [(x["event"], x["outcome"], x["reason"]) for x in records if x["event"] == "dry_run"] == \
        [("dry_run", "success", "new config")]


def test_a_dry_run_needs_a_staging_directory(tmp_path: Path, pebble: Any) -> None:
    """Without staging_directory (or --server) a dry run is refused, saying why; --server names one."""
    env = staged(tmp_path, pebble)
    r = env.run("renew", "--dry-run", "--all", check=2)
    assert "no [acme] staging_directory" in r.stderr and "rate limits" in r.stderr
    r = env.run("renew", "--dry-run", "--all", "--server", pebble.directory_url, check=0)
    assert "dry run OK" in r.stdout
    nothing_changed(env)


def test_a_failing_dry_run_says_why_and_leaves_the_schedule_alone(tmp_path: Path, pebble: Any) -> None:
    """A challenge the staging CA cannot validate fails the dry run with the CA's reason (exit 1),
    and the certificate's failure count and backoff are untouched."""
    env = CertdEnv(tmp_path, pebble)
    env.acme_extra = {"staging_directory": pebble.directory_url, "directory": f"https://127.0.0.1:{free_port()}/dir"}
    env.write_config([env.http_cert("www", [SNI], http01_listen=f"127.0.0.1:{free_port()}",
                                    deploy={"live_dir": str(tmp_path / "live" / "www")})])
    r = env.run("renew", "--dry-run", "www", check=1)
    assert "www: dry run failed:" in r.stdout and "http-01" in r.stdout
    nothing_changed(env)
