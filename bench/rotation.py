#!/usr/bin/env python3
"""Rotation benchmark (issue 3): how much a verified rotation costs on top of bare issuance,
and how fast a rollback proves the old certificate is served again.

Starts its own Pebble (real http-01 validation, PEBBLE_VA_NOSLEEP=1) and two nginx servers on
free loopback ports, then measures, in-process (no interpreter start-up in the figures):

  bare issuance   Issuer.issue + certcheck (what any ACME client must do)
  full rotation   Manager.renew_one --force: issue, check, store, stage, switch, nginx -t +
                  reload (waiting for nginx's old workers to retire), verify by handshake, commit
  rollback        a verification that fails (a second nginx behind the same name is never
                  reloaded); time from the failed verification to the old certificate proven
                  served again on both (switch back, nginx reload, handshakes)

Usage: .venv/bin/python bench/rotation.py [--runs N]      (prints a table; no pass/fail)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certd import config as config_mod  # noqa: E402
from certd.crypto import certcheck, keys  # noqa: E402
from certd.ops import log as logmod  # noqa: E402
from certd.engine.manager import Manager  # noqa: E402
from tests.support.certd_env import CertdEnv  # noqa: E402
from tests.support.pebble_fixtures import PebbleEnv  # noqa: E402
from tests.support.procs import free_port  # noqa: E402
from tests.support.server_fixtures import NginxServer  # noqa: E402

SNI = "www.example.test"


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    logmod.setup(logging.CRITICAL)  # the failing verifications below are intended
    work = Path(tempfile.mkdtemp(prefix="certd-bench-rotation-"))
    pebble = PebbleEnv(work / "pebble").start()
    servers: list[NginxServer] = []
    try:
        env = CertdEnv(work, pebble)
        env.refresh_root()
        live = work / "live" / "www"
        base = env.http_cert("www", [SNI], deploy={"live_dir": str(live)}, keep_versions=3, verify_timeout="1s")
        env.write_config([base])
        env.run("renew", "--all", check=0)
        for _ in range(2):
            d = work / f"nginx{len(servers)}"
            d.mkdir()
            servers.append(NginxServer(d, free_port(), live / "fullchain.pem", live / "privkey.pem",
                                       server_name=SNI, extra="", extra_http="").start())
        a, b = servers
        verify_a = {"endpoint": f"127.0.0.1:{a.port}", "sni": SNI, "ca_bundle": str(env.root_path)}
        verify_b = {"endpoint": f"127.0.0.1:{b.port}", "sni": SNI, "ca_bundle": str(env.root_path)}
        reload_a = [{"hook": "nginx", "config": str(a.config)}]

        # bare issuance
        env.write_config([{**base, "reload": reload_a, "verify": [verify_a]}])
        cfg = config_mod.load(env.config_path)
        mgr = Manager(cfg)
        cert = cfg.certificate("www")
        bare = []
        for _ in range(args.runs):
            t = time.perf_counter()
            key = keys.generate_private_key(cert.key_type)
            chain = mgr.issuer.issue(cert, key)
            certcheck.check_issued(chain, key, cert.domains, mgr.clock.now())
            bare.append(time.perf_counter() - t)

        # full rotation behind nginx, verified
        full = []
        for _ in range(args.runs):
            t = time.perf_counter()
            o = mgr.renew_one(cert, force=True, initiator="bench")
            full.append(time.perf_counter() - t)
            assert o.result == "renewed", o.message
        mgr.close()

        # rollback after a failed verification: nginx B is never reloaded
        env.write_config([{**base, "reload": reload_a, "verify": [verify_a, verify_b]}])
        cfg = config_mod.load(env.config_path)
        mgr = Manager(cfg)
        cert = cfg.certificate("www")
        b.reload()  # B serves the current version before each run
        rollback = []
        for _ in range(max(3, args.runs // 3)):
            marks: dict[str, float] = {}

            def progress(_name: str, message: str, marks: dict[str, float] = marks) -> None:
                if message.startswith("rolling back"):
                    marks["failed"] = time.perf_counter()
                elif message.startswith("rolled back"):
                    marks["proven"] = time.perf_counter()
            o = mgr.renew_one(cert, force=True, initiator="bench", progress=progress)
            assert o.result == "rolled_back", o.message
            rollback.append(marks["proven"] - marks["failed"])
        mgr.close()
    finally:
        for s in servers:
            s.stop()
        pebble.stop()

    rows = [
        ("bare issuance (issue + check)", median_ms(bare), "-"),
        ("full rotation, nginx, verified", median_ms(full), "-"),
        ("rotation overhead over issuance", median_ms(full) - median_ms(bare), "<= 200 ms"),
        ("rollback: failed verify -> old cert proven", median_ms(rollback), "<= 300 ms"),
    ]
    print(f"\nrotation benchmark: {args.runs} runs, medians (Pebble 2.10 real http-01 validation, nginx 1.22)")
    print(f"{'measure':45} {'ms':>8}  target")
    for name, ms, target in rows:
        print(f"{name:45} {ms:8.1f}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
