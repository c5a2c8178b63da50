#!/usr/bin/env python3
"""``certd status`` without a daemon over many certificates, no CA needed (issue 20).

Builds a state directory of N certificates (one real version written by ``FileStore``, then
copied N-1 times: minutes of fsyncs saved) and a config naming them, then times
``certd status --json`` as users run it (a process, no daemon: the CLI reads the store
itself, through the status index and the parsed-config cache once a first run built them),
and in-process the config load and the status rows with and without them.

Usage: .venv/bin/python bench/statusbench.py [--count N] [--keep]   (default 10000)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from certd.config.cache import CACHE_NAME  # noqa: E402
from certd.engine.statusindex import INDEX_NAME  # noqa: E402
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
    """In this process: the config load (afresh, then from the parsed-config cache), then every
    status row (as ``certd status --json``) from the store, then again from the status index."""
    from certd.config import cache
    from certd.engine.statusindex import StatusIndex
    logmod.setup(logging.CRITICAL)
    t0 = time.perf_counter()
    cfg = config_mod.load(config)
    t1 = time.perf_counter()
    cache.load_for_reading(config)
    t2 = time.perf_counter()
    mgr = build_manager(cfg)
    t3 = time.perf_counter()
    rows = [mgr.status_json(c) for c in cfg.certificates]
    t4 = time.perf_counter()
    mgr.close()
    mgr = build_manager(cfg)
    assert isinstance(mgr.store, FileStore)
    mgr.planner.index = StatusIndex.open(cfg, mgr.store.node)  # the CLI's (certd.cli_backends.Local)
    t5 = time.perf_counter()
    indexed = [mgr.status_json(c) for c in cfg.certificates]
    t6 = time.perf_counter()
    mgr.close()
    assert len(indexed) == len(rows)
    return {"config_s": t1 - t0, "config_cached_s": t2 - t1, "rows_s": t4 - t3, "rows_indexed_s": t6 - t5,
            "rows": len(rows)}


def _cli(config: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(config), "status", "--json"],
                   check=True, capture_output=True, cwd=ROOT, env=env)
    return time.perf_counter() - t


def measure(config: Path, runs: int = 3) -> dict[str, float]:
    """The CLI process with certd's bytecode compiled once (as an installed certd has it: a
    private pycache prefix, written by a first run that is not timed): its first run over a new
    state (no status index, no parsed-config cache: ``cold_s``), then the best of ``runs`` with
    both (a warm page cache, as an operator's second look has: ``cli_s``); the best of ``runs``
    compiling certd's source each time as a PYTHONDONTWRITEBYTECODE=1 shell does (``nopyc_s``);
    and one in-process probe in a fresh process (after the runs: the index and cache are warm)."""
    state = config.parent / "state"
    pyc = Path(tempfile.mkdtemp(prefix="certd-status-pyc-"))
    try:
        compiled = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        compiled["PYTHONPYCACHEPREFIX"] = str(pyc)
        subprocess.run([sys.executable, "-m", "certd.cli", "--version"], check=True, capture_output=True, cwd=ROOT,
                       env=compiled)
        _cli(config, compiled)  # the modules status imports, compiled
        for name in (INDEX_NAME, CACHE_NAME):
            (state / name).unlink(missing_ok=True)
        cold = _cli(config, compiled)
        warm = min(_cli(config, compiled) for _ in range(runs))
        nopyc = min(_cli(config, {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}) for _ in range(runs))
    finally:
        shutil.rmtree(pyc, ignore_errors=True)
    found = json.loads(subprocess.run([sys.executable, str(Path(__file__)), "--probe", str(config)], check=True,
                                      capture_output=True, text=True, cwd=ROOT).stdout)
    return {"cli_s": warm, "cold_s": cold, "nopyc_s": nopyc, **found}


def report(n: int, r: dict[str, float]) -> str:
    """The figures of :func:`measure` in a few lines."""
    return (f"certd status --json without a daemon, {n} certificates: {r['cli_s']:.2f} s "
            f"(first run over a new state {r['cold_s']:.2f} s; compiling certd's source each time "
            f"{r['nopyc_s']:.2f} s)\n  in-process: config load {r['config_s']:.2f} s, from the parsed-config cache "
            f"{r['config_cached_s']:.2f} s; rows from the store {r['rows_s']:.2f} s, from the status index "
            f"{r['rows_indexed_s']:.2f} s")


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
        print(report(args.count, r))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
