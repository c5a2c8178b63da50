"""Where one certificate's time goes (issue 20): N sequential first issuances through
``Manager.renew_one`` (as bench.py's "one certificate in-process") against a fast Pebble of
its own, taking turns with the limit client; prints both medians (wall and CPU) and, with
``--profile``, certd's cProfile by internal time (the limit client is not profiled).

    .venv/bin/python bench/oneprofile.py [N] [--profile] [--dump FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (puts the checkout on sys.path)
from certd import config as config_mod  # noqa: E402
from certd.daemon.wiring import build_manager  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", nargs="?", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="print certd's cProfile (top 40 by internal time)")
    ap.add_argument("--dump", help="also write the profile here (pstats format)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="certd-oneprofile-"))
    pebble = bench.PebbleEnv(work / "pebble", env=bench.FAST, validity=bench.VALIDITY)
    pebble.start()
    try:
        limit = bench.LimitClient(pebble.directory_url, str(pebble.ca_bundle))
        site = bench.Site(work / "site", pebble, 8)
        site.configure(bench.names("one", args.count + 1))
        cfg = config_mod.load(site.config)
        mgr = build_manager(cfg)
        certs = list(cfg.certificates)
        mgr.renew_one(certs[0], force=True, initiator="bench")  # registers the account
        limit.issue("warm.example.test")
        prof = cProfile.Profile() if args.profile or args.dump else None
        walls: dict[str, list[float]] = {"certd": [], "limit": []}
        cpus: dict[str, list[float]] = {"certd": [], "limit": []}
        for i, cert in enumerate(certs[1:]):
            t, c = time.perf_counter(), time.process_time()
            limit.issue(f"l{i}.example.test")
            walls["limit"].append(time.perf_counter() - t)
            cpus["limit"].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            if prof:
                prof.enable()
            outcome = mgr.renew_one(cert, force=True, initiator="bench")
            if prof:
                prof.disable()
            walls["certd"].append(time.perf_counter() - t)
            cpus["certd"].append(time.process_time() - c)
            if not outcome.ok:
                raise SystemExit(f"{cert.name}: {outcome.message}")
        mgr.close()
        med = {k: statistics.median(v) * 1000 for k, v in walls.items()}
        cpu = {k: statistics.median(v) * 1000 for k, v in cpus.items()}
        print(f"{args.count} certificates, medians: limit {med['limit']:.1f} ms (CPU {cpu['limit']:.1f}), "
              f"certd {med['certd']:.1f} ms (CPU {cpu['certd']:.1f}); ratio {med['certd'] / med['limit']:.2f}"
              f"{' (certd under the profiler)' if prof else ''}")
        if prof:
            if args.dump:
                prof.dump_stats(args.dump)
            if args.profile:
                pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    finally:
        pebble.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
