#!/usr/bin/env python3
"""``certd status`` without a daemon over many certificates, no CA needed (issue 20).

Builds a state directory of N certificates (one real version written by ``FileStore``, then
copied N-1 times: minutes of fsyncs saved) and a config naming them, then times
``certd status --json`` as users run it (a process, no daemon: the CLI reads the store
itself), and in-process the config load and the status rows.

Usage: .venv/bin/python bench/statusbench.py [--count N] [--keep]   (default 10000)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certd import config as config_mod  # noqa: E402
from certd.daemon.wiring import build_manager  # noqa: E402
from certd.ops import log as logmod  # noqa: E402
from certd.store.files import FileStore  # noqa: E402
from tests.support.certd_env import to_toml  # noqa: E402
from tests.support.certs import make_bundle  # noqa: E402


def build(work: Path, n: int) -> Path:
    """A state directory of ``n`` certificates s00000... and the config naming them; the config's path."""
    state = work / "state"
    store = FileStore(state)
    names = [f"s{i:05d}" for i in range(n)]
    bundle = make_bundle((f"{names[0]}.example.test",))
    with store.lock(names[0]):
        store.set_current(names[0], store.add_version(names[0], bundle, {"reason": "bench"}))
    template = state / "certs" / names[0]
    for name in names[1:]:
        shutil.copytree(template, state / "certs" / name, symlinks=True)
    certs = [{"name": name, "domains": [f"{names[0]}.example.test"], "challenge": "http-01",
              "http01_listen": "127.0.0.1:5002"} for name in names]
    config = work / "certd.toml"
    config.write_text(to_toml({"state_dir": str(state), "control_socket": str(work / "control.sock")},
                              {"directory": "https://127.0.0.1:14000/dir", "email": "ops@example.test",
                               "agree_tos": True}, certs))
    config.chmod(0o600)
    return config


def probe(config: Path) -> dict[str, float]:
    """In this process: the config load, then every status row (as ``certd status --json``)."""
    logmod.setup(logging.CRITICAL)
    t0 = time.perf_counter()
    cfg = config_mod.load(config)
    t1 = time.perf_counter()
    mgr = build_manager(cfg)
    rows = [mgr.status_json(c) for c in cfg.certificates]
    t2 = time.perf_counter()
    mgr.close()
    return {"config_s": t1 - t0, "rows_s": t2 - t1, "rows": len(rows)}


def measure(config: Path, runs: int = 3) -> dict[str, float]:
    """The best of ``runs`` (a warm page cache, as an operator's second look has) of the CLI
    process, and one in-process probe in a fresh process."""
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(config), "status", "--json"],
                       check=True, capture_output=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
    found = json.loads(subprocess.run([sys.executable, str(Path(__file__)), "--probe", str(config)], check=True,
                                      capture_output=True, text=True, cwd=ROOT).stdout)
    return {"cli_s": min(walls), **found}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="certd-status-"))
    try:
        t = time.perf_counter()
        config = build(work, args.count)
        print(f"built {args.count} certificates in {time.perf_counter() - t:.1f} s ({work})", file=sys.stderr)
        r = measure(config)
        print(f"certd status --json without a daemon, {args.count} certificates: {r['cli_s']:.2f} s "
              f"(in-process: config load {r['config_s']:.2f} s, rows {r['rows_s']:.2f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
