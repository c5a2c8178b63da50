"""dns-persist-01 against real Pebble 2.10's validator and pebble-challtestsrv's DNS: one
persistent TXT record naming the CA and the account, published by hand (as `certd
dns-persist-record` prints it) or by a hook once, and then no DNS change per order."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from tests.support.certd_env import HOOKS, CertdEnv
from tests.support.procs import wait_until


def counting_hook(tmp_path: Path, pebble: Any) -> tuple[list[str], Path]:
    """The repository's challtestsrv hook behind a wrapper that logs each call (argv list, no shell)."""
    log = tmp_path / "hook-calls.log"
    wrapper = tmp_path / "hooks" / "persist-hook"
    wrapper.parent.mkdir(mode=0o755)
    wrapper.write_text(f"#!{sys.executable} -IS\nimport os, sys\n"
                       f"with open({str(log)!r}, 'a') as f: f.write(' '.join(sys.argv[2:4]) + '\\n')\n"
                       f"os.execv({str(HOOKS / 'dns-challtestsrv')!r}, [{str(HOOKS / 'dns-challtestsrv')!r}] + sys.argv[1:])\n")
    wrapper.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return [str(wrapper), pebble.challtestsrv_url], log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_hook_publishes_the_record_once_and_orders_change_nothing(tmp_path: Path, pebble: Any) -> None:
    """With dns_persist_hook, the running daemon publishes each record once — the wildcard
    certificate's (policy=wildcard) beside the plain one's for the same name, neither removing
    the other — and further orders of both are validated with no DNS change."""
    hook, log = counting_hook(tmp_path, pebble)
    env = CertdEnv(tmp_path, pebble)
    base = "hooked.persist.test"
    env.write_config([{"name": name, "domains": domains, "challenge": "dns-persist-01", "dns_persist_hook": hook,
                       "deploy": {"live_dir": str(tmp_path / "live" / name)}}
                      for name, domains in (("p", [base, f"*.{base}"]), ("q", [base]))])
    daemon = env.start_daemon()
    wait_until(lambda: all(r["version"] == 1 for r in env.status().values()), timeout=60, what="first issuance")
    for _ in range(2):
        env.run("renew", "--force", "p", "q", "--wait", check=0)
    assert {n: r["version"] for n, r in env.status().items()} == {"p": 3, "q": 3}
    assert calls(log) == [f"persist {base}", f"persist {base}"]  # two values (with and without policy=wildcard)
    daemon.stop(timeout=30)


def test_a_record_published_by_hand_is_enough(tmp_path: Path, pebble: Any) -> None:
    """Without a hook: the order fails (held) naming the missing record; `certd dns-persist-record`
    prints it; once published, renewals succeed and keep succeeding without DNS changes."""
    env = CertdEnv(tmp_path, pebble)
    env.write_config([{"name": "m", "domains": ["manual.persist.test"], "challenge": "dns-persist-01",
                       "deploy": {"live_dir": str(tmp_path / "live")}}])
    r = env.run("renew", "--all", check=1)
    assert "dns-persist-01" in r.stdout + r.stderr and "TXT" in r.stdout + r.stderr
    assert env.status("m")["m"]["state"] == "held"
    printed = env.run("dns-persist-record", "m", check=0).stdout
    m = re.search(r'^(_validation-persist\.manual\.persist\.test\.) 300 IN TXT "([^"]+)"$', printed, re.M)
    assert m is not None and "accounturi=https://127.0.0.1:" in m.group(2), printed
    pebble.set_txt(m.group(1), m.group(2))  # what the operator publishes once
    for version in (1, 2):
        env.run("renew", "--force", "m", check=0)
        assert env.status("m")["m"]["version"] == version
    assert os.path.exists(tmp_path / "live" / "fullchain.pem")
