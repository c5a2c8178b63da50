"""What ``certd status`` without a daemon imports (issue 20: status at 10,000 certificates in
under a second, where the ACME client and httpx alone cost ~0.25 s of interpreter start-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.certd_env import to_toml

ROOT = Path(__file__).resolve().parents[2]

# Needed only where an order, an ARI poll, an alert or a request to the daemon happens.
NOT_FOR_STATUS = ("acme", "josepy", "requests", "httpx", "certd.acme.issuer", "certd.daemon.control")

PROBE = """
import json, sys
from certd import cli
code = cli.main(["--config", sys.argv[1], "status", "--json"])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_status_without_a_daemon_does_not_import_the_acme_client_or_httpx(tmp_path: Path) -> None:
    """``certd status`` without a daemon prints its rows without loading the ACME client or httpx."""
    config = tmp_path / "certd.toml"
    config.write_text(to_toml(
        {"state_dir": str(tmp_path / "state"), "control_socket": str(tmp_path / "control.sock")},
        {"directory": "https://127.0.0.1:14000/dir", "email": "ops@example.test", "agree_tos": True},
        [{"name": "www", "domains": ["www.example.test"], "challenge": "http-01", "http01_listen": "127.0.0.1:5002"}]))
    config.chmod(0o600)
    run = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["code"] == 0, run.stderr
    assert '"name": "www"' in run.stdout
    assert [m for m in NOT_FOR_STATUS if m in found["modules"]] == []
