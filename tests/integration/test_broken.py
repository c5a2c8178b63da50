"""One broken certificate never stops the rest (issue 12, F8): the daemon starts, renews the
others, and shows that one as ``broken`` with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.support.procs import wait_until


def test_missing_stored_version_marks_one_certificate_broken_and_the_daemon_serves_the_rest(
        tmp_path: Path, certd_env: Any, pebble: Any) -> None:
    """www's stored version is deleted behind certd's back: `certd run` starts anyway, issues the
    newly configured api, and status shows www broken with a reason naming what is missing."""
    env = certd_env(pebble)
    www = env.http_cert("www", ["www.example.test"], deploy={"live_dir": str(tmp_path / "live" / "www")})
    env.write_config([www])
    env.run("renew", "--all", check=0)
    shutil.rmtree(env.state_dir / "certs" / "www" / "versions" / "0001")
    api = env.http_cert("api", ["api.example.test"], deploy={"live_dir": str(tmp_path / "live" / "api")})
    env.write_config([www, api])
    daemon = env.start_daemon()
    wait_until(lambda: env.status("api")["api"]["version"] == 1 or not daemon.alive, timeout=60,
               what="api issued by the daemon")
    assert daemon.alive, daemon.log_text()
    row = env.status("www")["www"]
    assert row["state"] == "broken", row
    assert "0001" in row["broken_reason"] or "version" in row["broken_reason"], row
    assert env.status("api")["api"]["state"] == "ok"
    table = env.run("status", check=0).stdout
    assert "broken" in table and "www: broken: " in table
    assert "cert_broken" in daemon.log_text()
    daemon.stop(timeout=30)
    assert daemon.returncode == 0
