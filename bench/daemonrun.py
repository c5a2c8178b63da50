#!/usr/bin/env python3
"""``certd run`` over a state directory that already exists: start-up, memory, status, stop.

The footprint part of ``bash bench/run.sh`` issues its certificates first (100,000 take most
of an hour); with ``--keep`` it leaves them behind, and this measures the daemon over them
again, e.g. before and after a change, in minutes (issue 20):

    .venv/bin/python bench/daemonrun.py --config /tmp/certd-bench-XXXX/footprint-100000-NNNN/certd.toml

Or over a state built without a CA (``--build 100000``: two minutes; its certificates are not
due, so the daemon settles once its start-up work is done: ``--settle 600``).

It starts ``certd run`` from this checkout (with NOTIFY_SOCKET, as systemd would), prints
when READY=1 came and the daemon's RSS (and peak) then and ``--wait`` seconds later (or once
settled), times ``certd status --json`` (twice: the second finds the facts stamped current),
``certd status`` (the table) and ``certd status NAME --json`` as processes talking to the
daemon, with the daemon's CPU for each, and how long the daemon took to stop after SIGTERM.
The CA need not run: its ARI polls then fail fast and are retried later.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import statusbench  # noqa: E402
from bench import ROOT, STATUS_TARGET, Notify, cpu_seconds, memory_mb, wait_until  # noqa: E402


def memory(pid: int) -> str:
    """``pid``'s RSS and peak RSS, as text."""
    rss, peak = memory_mb(pid)
    return f"{rss:.0f} MB (peak {peak:.0f} MB)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the certd.toml of the kept state")
    where.add_argument("--build", type=int, metavar="N", help="build a state of N certificates without a CA "
                       "first (bench/statusbench.py: one self-signed version copied; ARI polls fail fast)")
    ap.add_argument("--wait", type=float, default=35.0, help="seconds after READY=1 before status (default 35)")
    ap.add_argument("--settle", type=float, metavar="MAX", help="instead of --wait: until the daemon's CPU stays "
                    "under 10 %% for 5 s (its start-up work done), at most MAX seconds")
    ap.add_argument("--name", help="the certificate for `status NAME` (default: the config's first)")
    ap.add_argument("--scrape", type=int, default=0, metavar="K", help="then GET /metrics K times from the "
                    "config's [daemon] metrics_listen: time, size, the daemon's CPU and RSS each")
    args = ap.parse_args()
    if args.build:
        args.config = statusbench.build(Path(tempfile.mkdtemp(prefix="certd-daemonrun-state-")), args.build)
        print(f"built {args.build} certificates: {args.config}", flush=True)
    certd = [sys.executable, "-m", "certd.cli", "--config", str(args.config)]
    name = args.name or _first_name(args.config)
    work = Path(tempfile.mkdtemp(prefix="certd-daemonrun-"))
    notify = Notify(work / "notify.sock")  # drained as systemd does: a full socket would hold the daemon
    started = time.perf_counter()
    daemon = subprocess.Popen([*certd, "run"], cwd=ROOT, stdout=open(work / "daemon.log", "wb"),
                              stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    try:
        wait_until(notify.ready, timeout=900, interval=0.1, what="READY=1")
        print(f"READY=1 after {(notify.ready_at or 0) - started:.1f} s; RSS {memory(daemon.pid)}", flush=True)
        if args.settle:
            waited = settle(daemon.pid, args.settle)
            print(f"{waited:.0f} s later (settled: {waited < args.settle}): RSS {memory(daemon.pid)}", flush=True)
        else:
            time.sleep(args.wait)
            print(f"{args.wait:g} s later: RSS {memory(daemon.pid)}", flush=True)
        for what in (["status", "--json"], ["status", "--json"], ["status"], ["status", name, "--json"]):
            t, cpu = time.perf_counter(), cpu_seconds(daemon.pid)
            out = subprocess.run([*certd, *what], cwd=ROOT, capture_output=True, check=True, timeout=600).stdout
            took = time.perf_counter() - t
            ok = "ok" if took <= STATUS_TARGET else "MISSED"
            judged = f"; <= {STATUS_TARGET:g} s: {ok}" if what[1:] == ["--json"] else ""
            print(f"certd {' '.join(what)}: {took:.2f} s ({len(out) / 1e6:.1f} MB; the daemon's CPU "
                  f"{cpu_seconds(daemon.pid) - cpu:.2f} s){judged}; RSS {memory(daemon.pid)}", flush=True)
        if args.scrape:
            scrape(daemon.pid, _daemon_value(args.config, "metrics_listen"), args.scrape)
    finally:
        t = time.perf_counter()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(300)
            print(f"stopped {time.perf_counter() - t:.1f} s after SIGTERM (exit {code}); "
                  f"its log: {work / 'daemon.log'}")
        except subprocess.TimeoutExpired:
            daemon.kill()
            print("still running 300 s after SIGTERM: killed")
        notify.close()
    return 0


def scrape(pid: int, listen: str | None, times: int) -> None:
    """GET /metrics ``times`` times, as Prometheus would, printing what each cost the daemon."""
    if listen is None:
        raise SystemExit("--scrape: the config's [daemon] has no metrics_listen")
    for i in range(times):
        t, cpu = time.perf_counter(), cpu_seconds(pid)
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=600) as r:
            body = r.read()
        series = body.count(b"\n") - body.count(b"\n#")
        print(f"GET /metrics #{i + 1}: {time.perf_counter() - t:.2f} s, {len(body) / 1e6:.1f} MB, {series:,} "
              f"series (the daemon's CPU {cpu_seconds(pid) - cpu:.2f} s); RSS {memory(pid)}", flush=True)


def _daemon_value(config: Path, key: str) -> str | None:
    """``key``'s string value in the config's [daemon] table, without parsing every table."""
    in_daemon = False
    with config.open() as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("["):
                if in_daemon:
                    return None
                in_daemon = stripped == "[daemon]"
            elif in_daemon and stripped.split("=", 1)[0].strip() == key:
                return stripped.split("=", 1)[1].strip().strip('"')
    return None


def settle(pid: int, limit: float) -> float:
    """Seconds until ``pid`` used under 10 % of a core over 5 s (at most ``limit``)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        cpu, t = cpu_seconds(pid), time.perf_counter()
        time.sleep(5.0)
        if (cpu_seconds(pid) - cpu) / (time.perf_counter() - t) < 0.1:
            break
    return time.perf_counter() - started


def _first_name(config: Path) -> str:
    in_cert = False
    with config.open() as f:  # the first [[certificate]]'s name, without parsing 100,000 tables
        for line in f:
            stripped = line.strip()
            if stripped.startswith("["):
                in_cert = stripped == "[[certificate]]"
            elif in_cert and stripped.split("=", 1)[0].strip() == "name":
                return stripped.split("=", 1)[1].strip().strip('"')
    raise SystemExit(f"{config}: no certificate name found; pass --name")


if __name__ == "__main__":
    raise SystemExit(main())
