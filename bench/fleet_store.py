#!/usr/bin/env python3
"""Fleet store benchmark (issue 16): what one rotation's store writes cost on the shared
PostgreSQL store (PgStore) against the single host's state directory (FileStore).

One rotation, as the engine writes it through the single-host Store interface:

  lease         lock(): take the certificate's lease (and release it at the end)
  add_version   the new version (key sealed under [keys], as a fleet requires)
  set_current   desired + this node's applied pointer
  journal x6    the rotation journal at issued, staged, switched, reloaded, verified, committed
  state CAS     read_state + write_state (compare-and-set on the etag)

N rotations (default 200) over 20 certificates, p50/p95 in ms per step and for the whole.
PostgreSQL is a private cluster on loopback started by this script **with fsync on** (the
tests' clusters run without it), so both stores pay for durability; FileStore fsyncs each file.
No CA, no network beyond loopback.

Usage: .venv/bin/python bench/fleet_store.py [--rotations N]   (or: bash bench/run.sh --only fleetstore)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certd.core.model import Bundle  # noqa: E402
from certd.crypto.custody import FileKek, KeyRing, new_kek_secret  # noqa: E402
from certd.store.files import FileStore  # noqa: E402
from tests.support.certs import make_bundle  # noqa: E402

STEPS = ("issued", "staged", "switched", "reloaded", "verified", "committed")
NAMES = 20


def rotation(store: Any, name: str, bundle: Bundle, times: dict[str, list[float]]) -> None:
    """One rotation's store writes, each step timed into ``times``."""
    def timed(what: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        times.setdefault(what, []).append(time.perf_counter() - t)
        return out

    start = time.perf_counter()
    lock = store.lock(name)
    timed("lease", lock.__enter__)
    try:
        journal: dict[str, Any] = {"name": name, "kind": "renew", "history": []}
        t = time.perf_counter()
        for i, step in enumerate(STEPS):
            journal = {**journal, "step": step, "history": [*journal["history"], [step, "2027-01-01T00:00:00Z"]]}
            store.save_journal(name, journal)
            if i == 0:
                version = timed("add_version", lambda: store.add_version(name, bundle, {"reason": "bench"}))
            if step == "switched":
                timed("set_current", functools.partial(store.set_current, name, version))
        times.setdefault("journal x6", []).append(time.perf_counter() - t - times["add_version"][-1]
                                                   - times["set_current"][-1])

        def cas() -> None:
            state, etag = store.read_state(name)
            store.write_state(name, {**(state or {}), "failures": 0, "last_result": "success"}, expected=etag)
        timed("state CAS", cas)
    finally:
        t = time.perf_counter()
        lock.__exit__(None, None, None)
        times["lease"][-1] += time.perf_counter() - t
    times.setdefault("rotation", []).append(time.perf_counter() - start)


def measure(store: Any, rotations: int) -> dict[str, list[float]]:
    bundle = make_bundle()
    times: dict[str, list[float]] = {}
    for i in range(3):  # warm-up: connections, directories, page cache
        rotation(store, f"warm{i}", bundle, {})
    for i in range(rotations):
        rotation(store, f"c{i % NAMES:02d}", bundle, times)
    return times


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rotations", type=int, default=200)
    args = ap.parse_args()
    ring = KeyRing(FileKek(new_kek_secret(), "bench"))
    from certd.store.pg import PgStore
    from tests.support.postgres import start_cluster
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="certd-fleetstore-") as tmp:
        results["FileStore"] = measure(FileStore(Path(tmp) / "state", keyring=ring), args.rotations)
    cluster = start_cluster(durable=True)
    try:
        with PgStore(cluster.database(), node="bench", keyring=ring) as pg:
            results["PgStore"] = measure(pg, args.rotations)
    finally:
        cluster.destroy()
    print(f"per-rotation store cost, {args.rotations} rotations over {NAMES} certificates "
          f"(ms, p50 / p95; keys sealed; PostgreSQL on loopback with fsync on)")
    print(f"{'step':<14}" + "".join(f"{k:>22}" for k in results))
    for step in ("lease", "add_version", "set_current", "journal x6", "state CAS", "rotation"):
        cells = [f"{pct(r[step], 0.5):8.2f} / {pct(r[step], 0.95):8.2f}" for r in results.values()]
        print(f"{step:<14}" + "".join(f"{c:>22}" for c in cells))
    ratio = statistics.median(results["PgStore"]["rotation"]) / statistics.median(results["FileStore"]["rotation"])
    print(f"PgStore / FileStore, whole rotation (p50): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
