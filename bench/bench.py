#!/usr/bin/env python3
"""certd performance benchmark (issue 6): batch renewals against the protocol's limit, the
daemon's footprint at thousands of certificates, and certbot for comparison.

One command, everything it needs started and stopped by itself (by PID)::

    bash bench/run.sh              # = .venv/bin/python bench/bench.py
    bash bench/run.sh --quick      # CI-sized: small counts, a short idle window, ~2 minutes

It starts two Pebble 2.10 servers on free loopback ports, both with PEBBLE_VA_NOSLEEP=1,
PEBBLE_WFE_NONCEREJECT=0 and PEBBLE_AUTHZREUSE=0:

- **fast mode** (PEBBLE_VA_ALWAYS_VALID=1): Pebble skips validation, so what is measured is
  the client and the protocol's round trips — the throughput figures;
- **real mode**: Pebble validates http-01 against the client's own responder — the figures
  comparable with certbot.

and measures, printing one table at the end:

1. **The protocol limit** (``bench/limit_client.py``): a minimal client on the ``acme``
   library, polling fast, nothing stored — sequential median ms/cert, and certs/s with 8
   worker threads (run before and after certd's batches; the reference is the mean).
2. **certd, one certificate, in-process**: ``Manager.renew_one(force=True)`` as the CLI builds
   it (``wiring.build_manager``: audit log and every other configured sink), timed per
   certificate — no interpreter start-up in the figure. The limit client and certd take turns,
   one certificate each, so both medians come from the same minutes of a machine whose disk
   and CPUs other work may share. Then the fsyncs of one rotation of a certificate with one
   ``live_dir``, counted through certd.fs's seam (target <= 12, issue 20).
3. **certd, batches**: ``certd renew --all --force`` as a process over a config with N
   certificates (http-01 standalone; ``[daemon] workers`` = ``--workers``), wall time
   including start-up.
4. **certbot** (PyPI, installed by this script into ``.cache/bench/certbot-venv``): ``certbot
   certonly --standalone`` for fresh names, one process each, real mode. certbot's random
   sleep (up to 8 minutes) only happens in ``certbot renew`` when stdin is not a terminal;
   ``certonly`` for a new name never takes that path, and ``--no-random-sleep-on-renew`` is
   passed as well — the figure is issuance.
5. **Footprint**: N certificates issued (fast mode, 6-hour lifetimes: real schedules, nothing
   due during the measurement), then ``certd run``: start-up until the control socket answers
   and until READY=1 (a NOTIFY_SOCKET of this script), RSS (VmRSS/VmHWM), CPU (utime+stime)
   over a window while the start-up ARI polls run (one per certificate, paced at 10 a
   second) and, where they end within a few minutes, over a window with nothing due;
   ``status --json`` in-process and through the daemon.

6. **Status without a daemon**: ``certd status --json`` as a process over N certificates
   (default 10,000) in a state directory built without a CA (bench/statusbench.py), with
   certd's bytecode compiled once and the status index and config cache a first run built;
   target <= 1 s. Also printed: that first run, and compiling the source each run.

Timing figures depend on what else runs on the machine: the load average before and after is
printed with the results. Nothing here is a pass/fail test; the table shows each target.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from certd import config as config_mod  # noqa: E402
from certd import fs as fsutil  # noqa: E402
from certd.crypto.kekload import create_kek_file  # noqa: E402
from certd.ops import log as logmod  # noqa: E402
from certd.daemon.control import ControlClient  # noqa: E402
from certd.daemon.service import ARI_START_RATE  # noqa: E402
from certd.daemon.wiring import build_manager  # noqa: E402
from limit_client import LimitClient  # noqa: E402
import statusbench  # noqa: E402
from tests.support.certd_env import CertdEnv  # noqa: E402
from tests.support.pebble_fixtures import PebbleEnv  # noqa: E402
from tests.support.procs import ManagedProcess, wait_until  # noqa: E402

VALIDITY = 6 * 3600          # Pebble default-profile validityPeriod: renewal ~3 h later, ARI every 36 min
CERTBOT_VENV = ROOT / ".cache" / "bench" / "certbot-venv"
FAST = {"PEBBLE_VA_ALWAYS_VALID": "1"}


@dataclass
class Sizes:
    limit_par: int
    single_fast: int
    single_real: int
    batch_real: tuple[int, ...]
    batch_fast: tuple[int, ...]
    certbot: int
    footprint: tuple[int, ...]
    idle: float
    status: int = 10000


FULL = Sizes(limit_par=400, single_fast=50, single_real=20, batch_real=(1, 100),
             batch_fast=(1, 100, 1000), certbot=5, footprint=(1000, 10000), idle=30.0)
QUICK = Sizes(limit_par=80, single_fast=10, single_real=5, batch_real=(1, 20),
              batch_fast=(1, 20, 100), certbot=2, footprint=(100,), idle=5.0, status=1000)
FSYNC_TARGET = 12         # per rotation with one live_dir (issue 20)
BATCH_TARGET = 0.9        # x the limit client's 8-thread throughput at 1,000 certificates (issue 20; issue 6: 0.7)
STATUS_TARGET = 1.0       # seconds, certd status --json without a daemon


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] = field(default_factory=dict)
    single: dict[str, float] = field(default_factory=dict)
    batch: dict[str, dict[str, float]] = field(default_factory=dict)
    certbot: dict[str, Any] = field(default_factory=dict)
    footprint: dict[str, dict[str, float]] = field(default_factory=dict)
    status: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def machine() -> dict[str, Any]:
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    os_name = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.system())
    version_file = ROOT / ".cache" / "pebble" / "bin" / "VERSION"
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 1024 / 1024), "os": os_name,
            "python": platform.python_version(),
            "pebble": version_file.read_text().strip() if version_file.exists() else "?",
            "load_before": os.getloadavg()[0]}


# --- certd as users run it -------------------------------------------------------------------


def certd_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "certd.cli", "--config", str(config), *args]


class PebbleStalled(RuntimeError):
    """Pebble stopped answering (its in-memory store can deadlock under many concurrent orders).
    ``working_s``: how long the command ran until Pebble's last issuance; ``cpu_s``: its CPU."""

    def __init__(self, message: str, working_s: float = 0.0, cpu_s: float = 0.0) -> None:
        super().__init__(message)
        self.working_s, self.cpu_s = working_s, cpu_s


def run_certd(config: Path, *args: str, pebble: PebbleEnv | None = None,
              stall: float = 60.0,
              ok_codes: tuple[int, ...] = (0,)) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, CPU seconds of the process, result) of one certd command.

    With ``pebble``: PebbleStalled (certd stopped by PID) once Pebble has issued nothing for
    ``stall`` seconds while certd runs. Pebble can wedge for good: its Order() handler takes an
    order's read lock twice, and a CompleteOrder() between the two deadlocks it
    (Go's RWMutex is not reentrant once a writer waits); then every request hangs. Seen here every
    few thousand orders."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    argv = certd_argv(config, *args)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = pebble.workdir / "pebble.log" if pebble is not None else None
    offset = log.stat().st_size if log is not None else 0
    changed = began = time.monotonic()
    while True:
        try:
            out, err = proc.communicate(timeout=5)
            break
        except subprocess.TimeoutExpired:
            if log is None:
                continue
            with open(log, "rb") as f:  # progress = certificates issued since the last look
                f.seek(offset)
                new = f.read()
            offset += len(new)
            if b"Issued certificate" in new:
                changed = time.monotonic()
            elif time.monotonic() - changed > stall:
                proc.kill()
                proc.communicate()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                raise PebbleStalled(f"Pebble (pid {pebble.pebble_pid}) issued nothing for {stall:g} s "  # type: ignore[union-attr]
                                    f"(wedged: its Order handler read-locks an order twice)", changed - began,
                                    cpu) from None
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if r.returncode not in ok_codes:
        raise RuntimeError(f"certd {' '.join(args)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return wall, cpu, r


class Site:
    """One certd state directory + config against one Pebble (keys sealed under a KEK when
    ``Site.sealed``: ``--keys``)."""

    sealed = False

    def __init__(self, work: Path, pebble: PebbleEnv, workers: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.env = CertdEnv(work, pebble)
        self.env.daemon_extra = {"workers": workers}
        self.pebble = pebble
        if self.sealed:
            kek = work / "kek"
            if not kek.exists():
                create_kek_file(kek)
            self.env.tables = {"keys": {"kek_file": str(kek)}}

    def configure(self, names: list[str], workers: int | None = None) -> Path:
        if workers is not None:
            self.env.daemon_extra = {"workers": workers}
        return self.env.write_config([self.env.http_cert(n, [f"{n}.example.test"]) for n in names])

    @property
    def config(self) -> Path:
        return self.env.config_path


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


# --- 1 + 2. the protocol limit and one certificate in-process, interleaved ------------------------
#
# Other work on the machine (disk flushes above all) moves these figures by tens of percent
# from one minute to the next, so the limit client and certd take turns, one certificate each:
# both medians come from the same minutes.


def bench_sequential(site: Site, pebble: PebbleEnv, count: int, label: str, real: bool, res: Results) -> None:
    say(f"sequential, {label} mode: limit client and certd renew_one in turns, {count} certificates each")
    lc = LimitClient(pebble.directory_url, str(pebble.ca_bundle), http_port=pebble.http_port if real else None)
    site.configure(names(f"one-{label}", count + 1))
    cfg = config_mod.load(site.config)
    mgr = build_manager(cfg)  # as the CLI builds it: the audit log and every configured sink
    limit_times, certd_times = [], []
    lc_names = [f"{n}.example.test" for n in names(f"limit-{label}", count + 1)]
    try:
        for i, cert in enumerate(cfg.certificates):
            # In real mode both answer http-01 on Pebble's http port: the limit client's
            # responder runs only around its own order (started and stopped outside the timing).
            with lc.responding():
                started = time.perf_counter()
                lc.issue(lc_names[i])
                limit_elapsed = time.perf_counter() - started
            started = time.perf_counter()
            outcome = mgr.renew_one(cert, force=True, initiator="bench")
            certd_elapsed = time.perf_counter() - started
            if not outcome.ok:
                raise RuntimeError(f"{cert.name}: {outcome.message}")
            if i:  # the first of each registers its ACME account
                limit_times.append(limit_elapsed)
                certd_times.append(certd_elapsed)
    finally:
        mgr.close()
    key = "" if label == "fast" else "_real"
    res.limit[f"seq{key}_ms"] = statistics.median(limit_times) * 1000
    res.single[f"{label}_ms"] = statistics.median(certd_times) * 1000
    say(f"  limit {res.limit[f'seq{key}_ms']:.1f} ms/cert, certd {res.single[f'{label}_ms']:.1f} ms/cert (medians)")
    if label == "fast":
        bench_fsyncs(site, res)


def bench_fsyncs(site: Site, res: Results, rotations: int = 5) -> None:
    """fsyncs of one forced renewal of a certificate with one live_dir (median over
    ``rotations``; the first, which issues version 1, not counted), through certd.fs's seam."""
    site.env.write_config([site.env.http_cert("fsyncs", ["fsyncs.example.test"],
                                              deploy={"live_dir": str(site.env.dir / "live" / "fsyncs")})])
    cfg = config_mod.load(site.config)
    mgr = build_manager(cfg)
    counts = []
    try:
        for i in range(rotations + 1):
            with fsutil.counting_fsyncs() as count:
                outcome = mgr.renew_one(cfg.certificates[0], force=True, initiator="bench",
                                        ignore_duplicate_limit=True)
            if not outcome.ok:
                raise RuntimeError(f"fsyncs: {outcome.message}")
            if i:
                counts.append(count.total)
    finally:
        mgr.close()
    res.single["fsyncs"] = statistics.median(counts)
    say(f"  fsyncs per rotation with one live_dir: {res.single['fsyncs']:g}")


def bench_status(work: Path, n: int, res: Results) -> None:
    """``certd status --json`` without a daemon over ``n`` certificates (bench/statusbench.py)."""
    say(f"status without a daemon: building {n} certificates (no CA)")
    config = statusbench.build(work, n)
    res.status = {"n": n, **statusbench.measure(config)}
    say("  " + statusbench.report(n, res.status).replace("\n", "\n  "))


def bench_limit_parallel(fast: PebbleEnv, count: int, res: Results) -> None:
    say(f"protocol limit, 8 threads: {count} certificates")
    lc = LimitClient(fast.directory_url, str(fast.ca_bundle))
    lc.run([f"{n}.example.test" for n in names("limit-warm", 3)], 1)
    par = lc.run([f"{n}.example.test" for n in names(f"limit-par{len(res.limit)}", count)], 8)
    res.limit.setdefault("par_runs", []).append(par.per_second)
    res.limit["par_per_s"] = statistics.mean(res.limit["par_runs"])
    say(f"  {par.per_second:.1f} certs/s")


# --- 3. batches through the CLI ---------------------------------------------------------------


def bench_batches(site: Site, counts: tuple[int, ...], label: str, res: Results) -> None:
    site.configure(["warm"])
    run_certd(site.config, "renew", "--all", "--force", pebble=site.pebble)  # registers the account
    for n in counts:
        site.configure(names(f"b{n}-{label}", n))
        say(f"certd renew --all --force: {n} certificates ({label})")
        assert site.pebble.pebble_pid is not None
        pebble_cpu = cpu_seconds(site.pebble.pebble_pid)
        wall, cpu, r = run_certd(site.config, "renew", "--all", "--force", pebble=site.pebble, ok_codes=(0, 1))
        pebble_cpu = cpu_seconds(site.pebble.pebble_pid) - pebble_cpu
        renewed = sum(1 for line in r.stdout.splitlines() if ": renewed: version" in line)
        failed = [line for line in r.stdout.splitlines() if line and ": renewed: version" not in line]
        if failed and all("timed out" in line for line in failed):
            # The lock of run_certd's docstring, held by one order only: Pebble never answers
            # that order's request, certd gives it up after its 30 s network timeout, and the
            # batch's wall time measures Pebble's hang. Run the part again on a fresh Pebble.
            raise PebbleStalled(f"Pebble never answered {len(failed)} order(s): {failed[0][:160]}")
        if failed:
            raise RuntimeError(f"expected {n} renewed, got {renewed}:\n{r.stdout[-2000:]}")
        res.batch[f"{label}_{n}"] = {"n": n, "renewed": renewed, "seconds": wall, "per_s": renewed / wall,
                                     "cpu_ms_per_cert": cpu / n * 1000, "pebble_cpu_ms_per_cert": pebble_cpu / n * 1000}
        say(f"  {wall:.2f} s, {renewed / wall:.1f} certs/s, CPU per certificate: certd {cpu / n * 1000:.1f} ms, "
            f"Pebble {pebble_cpu / n * 1000:.1f} ms")


# --- 4. certbot ---------------------------------------------------------------------------------


def ensure_certbot() -> Path | None:
    certbot = CERTBOT_VENV / "bin" / "certbot"
    if certbot.exists():
        return certbot
    say(f"installing certbot from PyPI into {CERTBOT_VENV}")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(CERTBOT_VENV)], check=True, capture_output=True)
        subprocess.run([str(CERTBOT_VENV / "bin" / "pip"), "install", "-q", "certbot"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        say(f"  certbot could not be installed ({e}); skipping the comparison")
        shutil.rmtree(CERTBOT_VENV, ignore_errors=True)
        return None
    return certbot


def bench_certbot(real: PebbleEnv, work: Path, count: int, res: Results) -> None:
    certbot = ensure_certbot()
    if certbot is None:
        return
    version = subprocess.run([str(certbot), "--version"], capture_output=True, text=True).stdout.strip()
    dirs = ["--config-dir", str(work / "config"), "--work-dir", str(work / "work"), "--logs-dir", str(work / "logs")]
    common = ["--server", real.directory_url, "--non-interactive", "--agree-tos", "-m", "bench@example.test", *dirs]
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(real.ca_bundle)}  # trust Pebble's HTTPS
    subprocess.run([str(certbot), "register", "--no-eff-email", *common], check=True, capture_output=True, env=env)
    say(f"{version}: certonly --standalone, {count} certificates, one process each")
    times = []
    for n in names("certbot", count):
        started = time.perf_counter()
        subprocess.run([str(certbot), "certonly", "--standalone", "-d", f"{n}.example.test",
                        "--http-01-port", str(real.http_port), "--http-01-address", "127.0.0.1",
                        "--key-type", "ecdsa", "--no-random-sleep-on-renew", *common],
                       check=True, capture_output=True, env=env, stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    res.certbot.update(version=version, n=count, median_s=statistics.median(times), mean_s=statistics.mean(times))
    say(f"  median {statistics.median(times):.2f} s/cert")


# --- 5. footprint ---------------------------------------------------------------------------------


class Notify:
    """A NOTIFY_SOCKET for the daemon, drained by a thread as systemd would (a full socket
    would block the daemon's sd_notify): records when READY=1 arrives, counts STATUS= lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None
        self.statuses = 0
        self._stop = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop:
            try:
                lines = self.sock.recv(65536).split(b"\n")
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in lines and self.ready_at is None:
                self.ready_at = time.perf_counter()
            self.statuses += sum(1 for line in lines if line.startswith(b"STATUS="))

    def ready(self) -> bool:
        return self.ready_at is not None

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)


def status_probe(config: Path) -> dict[str, float]:
    """``--status-probe``: in a fresh process, the status rows of every certificate, in-process."""
    logmod.setup(logging.CRITICAL)
    started = time.perf_counter()
    cfg = config_mod.load(config)
    loaded = time.perf_counter()
    mgr = build_manager(cfg)
    rows = [mgr.status(c) for c in cfg.certificates]
    done = time.perf_counter()
    json.dumps({"certificates": rows}, indent=2)
    return {"config_s": loaded - started, "status_s": done - loaded, "rows": len(rows),
            "json_s": time.perf_counter() - done}


def bench_footprint(site: Site, n: int, idle: float, res: Results, issue_workers: int, workers: int) -> None:
    site.configure(names(f"fp{n}", n), workers=issue_workers)
    say(f"footprint {n}: issuing {n} certificates (fast mode, batch, {issue_workers} workers)")
    wall = cpu = pebble_cpu = 0.0
    restarts = 0
    todo = names(f"fp{n}", n)
    while todo:
        # Pebble wedges every few thousand orders (see run_certd): then it is restarted on the
        # same ports and only the names still without a certificate are ordered again.
        assert site.pebble.pebble_pid is not None
        p0 = cpu_seconds(site.pebble.pebble_pid)
        try:
            # At most 20,000 names a process: 100,000 of them exceed the kernel's ARG_MAX.
            w, c, _ = run_certd(site.config, "renew", "--force", *todo[:20000], pebble=site.pebble)
            wall, cpu, pebble_cpu = wall + w, cpu + c, pebble_cpu + cpu_seconds(site.pebble.pebble_pid) - p0
        except PebbleStalled as e:
            wall, cpu = wall + e.working_s, cpu + e.cpu_s
            pebble_cpu += cpu_seconds(site.pebble.pebble_pid) - p0
            restarts += 1
            if restarts > max(5, n // 2000):  # a wedge every few thousand orders
                raise
            site.pebble.restart()
            site.env.refresh_root()
            say(f"  {e}; restarted it on the same ports")
        todo = [name for name in todo if not (site.env.state_dir / "certs" / name / "current").exists()]
    row: dict[str, float] = {"issue_s": wall, "issue_per_s": n / wall, "issue_cpu_ms_per_cert": cpu / n * 1000,
                             "issue_pebble_cpu_ms_per_cert": pebble_cpu / n * 1000, "issue_restarts": restarts}
    say(f"  issued in {wall:.1f} s ({n / wall:.1f}/s; CPU per certificate: certd {cpu / n * 1000:.1f} ms, "
        f"Pebble {pebble_cpu / n * 1000:.1f} ms)"
        + (f"; not counting {restarts} Pebble restart(s)" if restarts else ""))
    site.configure(names(f"fp{n}", n), workers=workers)

    notify = Notify(site.env.dir / "notify.sock")
    # Not beside certd.toml: the daemon watches that directory for config edits, and every line
    # it logs would wake the watcher (CPU that belongs to the benchmark, not to certd).
    daemon = ManagedProcess(certd_argv(site.config, "run"), log_path=site.env.dir / "logs" / "daemon.log", cwd=ROOT,
                            env={"NOTIFY_SOCKET": str(notify.path)}, name="certd run")
    client = ControlClient(site.env.socket, timeout=60)
    one = names(f"fp{n}", 1)
    try:
        started = time.perf_counter()
        daemon.start()
        assert daemon.pid is not None
        daemon.wait_ready(lambda: client.get("/v1/status", params={"name": one}), 120, "control socket answering",
                          ignore=(OSError, Exception))
        row["socket_s"] = time.perf_counter() - started
        daemon.wait_ready(notify.ready, 300, "READY=1")
        row["ready_s"] = (notify.ready_at or 0) - started
        say(f"  certd run: control socket answers after {row['socket_s']:.2f} s, READY=1 after {row['ready_s']:.2f} s")
        time.sleep(min(5.0, idle))  # let start-up work (logging, first ARI polls) settle
        jobs_before = daemon.log_text().count("renewal_scheduled")
        cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
        time.sleep(idle)
        busy = cpu_seconds(daemon.pid) - cpu0
        row["idle_cpu_pct"] = busy / (time.perf_counter() - t0) * 100
        row["idle_jobs"] = daemon.log_text().count("renewal_scheduled") - jobs_before
        row["rss_mb"], row["hwm_mb"] = memory_mb(daemon.pid)
        say(f"  idle {idle:g} s: CPU {row['idle_cpu_pct']:.2f} % ({row['idle_jobs']} scheduled ARI polls ran); "
            f"RSS {row['rss_mb']:.1f} MB (peak {row['hwm_mb']:.1f} MB)")

        timings = []
        for _ in range(2):  # the request certd status --json makes (the whole listing, one row a line)
            t = time.perf_counter()
            rows = json.loads(client.get_text("/v1/status", params={"format": "lines"}))["certificates"]
            timings.append(time.perf_counter() - t)
        assert len(rows) == n
        row["status_daemon_s"], row["status_daemon_warm_s"] = timings
        t = time.perf_counter()
        subprocess.run(certd_argv(site.config, "status", "--json"), check=True, capture_output=True, cwd=ROOT)
        row["status_cli_daemon_s"] = time.perf_counter() - t
        row["rss_after_status_mb"], row["hwm_mb"] = memory_mb(daemon.pid)
        probe = json.loads(subprocess.run([sys.executable, str(Path(__file__)), "--status-probe", str(site.config)],
                                          check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        row["status_inproc_s"], row["config_load_s"] = probe["status_s"], probe["config_s"]
        say(f"  status --json: through the daemon {timings[0]:.2f} s (again {timings[1]:.2f} s; CLI process "
            f"{row['status_cli_daemon_s']:.2f} s); in-process {probe['status_s']:.2f} s "
            f"(+ config load {probe['config_s']:.2f} s)")

        # A forced renewal of one certificate through the daemon (the CLI process, as on-call
        # would type it): it should not cost more at 100,000 than at 1,000.
        forced = []
        for name in names(f"fp{n}", 3)[1:]:
            t = time.perf_counter()
            subprocess.run(certd_argv(site.config, "renew", name, "--force", "--reason", "bench", "--wait"),
                           check=True, capture_output=True, cwd=ROOT)
            forced.append(time.perf_counter() - t)
        row["forced_s"] = statistics.median(forced)
        say(f"  renew NAME --force --wait through the daemon: {', '.join(f'{x:.2f}' for x in forced)} s")

        # The window above overlaps the start-up ARI polls (one per certificate, paced at
        # ARI_START_RATE a second). When they end soon enough, measure again once nothing is due.
        if n / ARI_START_RATE <= 150:
            polled = lambda: daemon.log_text().count("renewal_scheduled") >= 2 * n  # noqa: E731
            wait_until(polled, timeout=n / ARI_START_RATE + 120, interval=1, what="the start-up ARI polls")
            time.sleep(2)
            jobs_before = daemon.log_text().count("renewal_scheduled")
            cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
            time.sleep(idle)
            row["quiet_cpu_pct"] = (cpu_seconds(daemon.pid) - cpu0) / (time.perf_counter() - t0) * 100
            row["quiet_jobs"] = daemon.log_text().count("renewal_scheduled") - jobs_before
            row["rss_quiet_mb"], row["hwm_mb"] = memory_mb(daemon.pid)
            say(f"  idle {idle:g} s once every ARI poll is done: CPU {row['quiet_cpu_pct']:.2f} % "
                f"({row['quiet_jobs']} jobs ran); RSS {row['rss_quiet_mb']:.1f} MB")
    finally:
        code = daemon.stop(timeout=60)
        notify.close()
        res.footprint[str(n)] = row
    row["exit_code"] = code if code is not None else -1


# --- report ---------------------------------------------------------------------------------------


def report(res: Results, sizes: Sizes) -> str:
    """The table; a part that was skipped or failed is left out (its failure is listed)."""
    m, lim, single, batch, cb, fp = res.machine, res.limit, res.single, res.batch, res.certbot, res.footprint
    out = [f"certd benchmark: {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, "
           f"Pebble {m['pebble']}; load average {m['load_before']:.1f} before, {m.get('load_after', 0):.1f} after"]
    if m.get("pebble_wedges"):
        out.append(f"(Pebble wedged {m['pebble_wedges']} time(s), an order read-locked twice: that part was run again "
                   "with a fresh Pebble)")
    for name, why in res.failures.items():
        out.append(f"NOT MEASURED: {name}: {why}")
    out.append("")

    def line(what: str, value: str, target: str = "", verdict: str = "") -> None:
        out.append(f"  {what:<46} {value:>22}  {target:<32} {verdict}".rstrip())

    def check(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    if lim:
        out.append("protocol limit (acme library, fast polling, nothing stored)")
        if "seq_ms" in lim:
            line("sequential, fast mode (median)", f"{lim['seq_ms']:.1f} ms/cert")
        if "par_per_s" in lim:
            line("8 threads, fast mode", f"{lim['par_per_s']:.1f} certs/s",
                 "runs: " + ", ".join(f"{r:.1f}" for r in lim["par_runs"]))
        if "seq_real_ms" in lim:
            line("sequential, real http-01 validation", f"{lim['seq_real_ms']:.1f} ms/cert")
        out.append("")
    if single or batch:
        out.append("certd")
    if "fast_ms" in single and "seq_ms" in lim:
        limit_single = 1.5 * lim["seq_ms"]
        line("one certificate in-process, fast (median)", f"{single['fast_ms']:.1f} ms/cert",
             f"<= 1.5 x limit = {limit_single:.1f} ms", check(single["fast_ms"] <= limit_single))
        line("  ratio to the limit", f"{single['fast_ms'] / lim['seq_ms']:.2f}")
    if "fsyncs" in single:
        line("fsyncs per rotation, one live_dir (median)", f"{single['fsyncs']:g}", f"<= {FSYNC_TARGET}",
             check(single["fsyncs"] <= FSYNC_TARGET))
    if "real_ms" in single and "seq_real_ms" in lim:
        line("one certificate in-process, real", f"{single['real_ms']:.1f} ms/cert",
             f"(limit {lim['seq_real_ms']:.1f} ms)")
    for key, b in batch.items():
        label, count = key.rsplit("_", 1)
        line(f"renew --all --force, {count} certs, {label}", f"{b['seconds']:.2f} s = {b['per_s']:.1f}/s",
             f"CPU/cert certd {b['cpu_ms_per_cert']:.0f} ms, Pebble {b['pebble_cpu_ms_per_cert']:.0f} ms")
    fast_batches = [b for k, b in batch.items() if k.startswith("fast_")]
    if fast_batches and "par_per_s" in lim:
        big = max(fast_batches, key=lambda b: b["n"])
        want = BATCH_TARGET * lim["par_per_s"]
        line(f"batch throughput ({int(big['n'])}, fast)", f"{big['per_s']:.1f} certs/s",
             f">= {BATCH_TARGET} x limit = {want:.1f}/s", check(big["per_s"] >= want))
        line("  ratio to the limit's 8 threads", f"{big['per_s'] / lim['par_per_s']:.2f}")
    real_batches = [b for k, b in batch.items() if k.startswith("real_")]
    if cb:
        out.append("")
        out.append(f"certbot ({cb['version']}, certonly --standalone, one process per certificate)")
        line(f"per certificate, real mode (median of {cb['n']})", f"{cb['median_s']:.2f} s")
        if real_batches:
            big = max(real_batches, key=lambda b: b["n"])
            ratio = cb["median_s"] * big["n"] / big["seconds"]
            line(f"certd vs certbot at N = {int(big['n'])}",
                 f"{cb['median_s'] * big['n']:.0f} s vs {big['seconds']:.2f} s")
            line("  throughput ratio certd/certbot", f"{ratio:.0f} x", ">= 30 x", check(ratio >= 30))
    if res.status:
        st = res.status
        out.append("")
        out.append(f"status without a daemon ({int(st['n'])} certificates, no CA; the CLI reads the store itself)")
        line("certd status --json, whole process", f"{st['cli_s']:.2f} s", f"<= {STATUS_TARGET:g} s",
             check(st["cli_s"] <= STATUS_TARGET))
        line("  first run over a new state (no index, no config cache)", f"{st['cold_s']:.2f} s")
        line("  compiling certd's source each run (PYTHONDONTWRITEBYTECODE=1)", f"{st['nopyc_s']:.2f} s")
        line("  in-process: config load / from the cache", f"{st['config_s']:.2f} s / {st['config_cached_s']:.2f} s")
        line("  in-process: rows from the store / the index", f"{st['rows_s']:.2f} s / {st['rows_indexed_s']:.2f} s")
    if fp:
        out.append("")
        out.append("daemon footprint (certd run; 6-hour certificates, nothing due)")
    first = None
    for key, f in fp.items():
        n = int(key)
        out.append(f"  {n} certificates (issued in {f['issue_s']:.0f} s, {f['issue_per_s']:.1f}/s; CPU/cert "
                   f"certd {f['issue_cpu_ms_per_cert']:.0f} ms, Pebble {f['issue_pebble_cpu_ms_per_cert']:.0f} ms)")
        if "ready_s" not in f:
            continue
        line("start-up: control socket answers", f"{f['socket_s']:.2f} s")
        ready_limit = 10 if n <= 10000 else 60   # issue 6 up to 10,000; issue 20 at 100,000
        line("start-up: READY=1", f"{f['ready_s']:.2f} s", f"<= {ready_limit} s", check(f["ready_s"] <= ready_limit))
        rss_limit = 80 if n <= 1000 else 1024 if n >= 100000 else None
        rss_target = f"<= {rss_limit} MB" if rss_limit else "roughly linear"
        line("RSS (peak)", f"{f['rss_mb']:.1f} MB ({f['hwm_mb']:.1f})", rss_target,
             check(f["hwm_mb"] <= rss_limit) if rss_limit else "")
        if first is not None and n > first[0]:
            per_cert = (f["rss_mb"] - first[1]) / (n - first[0]) * 1024
            line("  RSS growth per certificate", f"{per_cert:.1f} KB")
        first = first or (n, f["rss_mb"])
        line(f"CPU over {sizes.idle:g} s of start-up ARI polls", f"{f['idle_cpu_pct']:.2f} %",
             f"{int(f['idle_jobs'])} polls ran ({ARI_START_RATE:g}/s)")
        if "quiet_cpu_pct" in f:
            line(f"idle CPU over {sizes.idle:g} s, nothing due", f"{f['quiet_cpu_pct']:.2f} %",
                 f"near zero ({int(f['quiet_jobs'])} jobs ran)", check(f["quiet_cpu_pct"] < 1))
        if "status_inproc_s" in f:
            line("status --json in-process", f"{f['status_inproc_s']:.2f} s", "<= 1 s" if n <= 10000 else "",
                 check(f["status_inproc_s"] <= 1) if n <= 10000 else "")  # issue 20: at 10,000
            line("certd status --json through the daemon (the process)", f"{f['status_cli_daemon_s']:.2f} s",
                 "<= 1 s", check(f["status_cli_daemon_s"] <= 1))
            line("  its request alone (first, again)",
                 f"{f['status_daemon_s']:.2f} s, {f['status_daemon_warm_s']:.2f} s",
                 f"config load {f['config_load_s']:.2f} s (the CLI does not load it)")
        if "forced_s" in f:
            line("renew NAME --force --wait through the daemon (median of 2)", f"{f['forced_s']:.2f} s",
                 "as at 1,000")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized counts and a 5 s idle window")
    ap.add_argument("--workers", type=int, default=8, help="[daemon] workers for certd (default 8)")
    ap.add_argument("--issue-workers", type=int, default=4,
                    help="workers for issuing the footprint certificates (default 4: Pebble wedges more "
                         "often under more concurrent orders)")
    ap.add_argument("--no-certbot", action="store_true", help="skip the certbot comparison")
    ap.add_argument("--footprint", type=int, nargs="*", help="footprint sizes (default 1000 10000; --quick: 100)")
    ap.add_argument("--status-count", type=int, help="certificates for status without a daemon (default 10000; "
                    "--quick: 1000)")
    ap.add_argument("--only", choices=["single", "batch", "certbot", "footprint", "status"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--keys", action="store_true", help="certd with [keys]: every stored key sealed under a KEK")
    ap.add_argument("--status-probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.status_probe:
        print(json.dumps(status_probe(args.status_probe)))
        return 0
    sizes = QUICK if args.quick else FULL
    Site.sealed = args.keys
    if args.footprint is not None:
        sizes.footprint = tuple(args.footprint)
    if args.status_count is not None:
        sizes.status = args.status_count
    parts = set(args.only or ["single", "batch", "certbot", "footprint", "status"])
    if args.no_certbot:
        parts.discard("certbot")
    logmod.setup(logging.CRITICAL)
    res = Results(machine=machine())
    work = Path(tempfile.mkdtemp(prefix="certd-bench-"))
    say(f"work directory {work}")
    pebbles: list[PebbleEnv] = []

    def pebble(label: str, fast: bool) -> PebbleEnv:
        """A fresh Pebble for one part: a long-lived one slows down (O(n) lookups in its
        in-memory store) and, once in a long while, deadlocks."""
        p = PebbleEnv(work / f"pebble-{label}", env=FAST if fast else None, validity=VALIDITY)
        pebbles.append(p)
        p.start()
        say(f"Pebble {label} ({'fast' if fast else 'real validation'}): pid {p.pebble_pid}")
        return p

    def part(name: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is recorded and reported, and the other parts still run."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the table shows what could be measured
            res.failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            say(f"  {name} failed: {res.failures[name]}")

    def retried(label: str, fn: Callable[[PebbleEnv], None]) -> None:
        for attempt in (1, 2, 3):
            p = pebble(f"{label}-{attempt}", fast=True)
            try:
                fn(p)
                return
            except PebbleStalled as e:
                res.machine["pebble_wedges"] = res.machine.get("pebble_wedges", 0) + 1
                say(f"  {e}; once more with a fresh Pebble")
                if attempt == 3:
                    raise
            finally:
                p.stop()

    try:
        real = pebble("real", fast=False)
        if "single" in parts:
            fast = pebble("sequential", fast=True)
            part("sequential, fast", lambda: bench_sequential(Site(work / "single-fast", fast, args.workers), fast,
                                                              sizes.single_fast, "fast", False, res))
            fast.stop()
            part("sequential, real", lambda: bench_sequential(Site(work / "single-real", real, args.workers), real,
                                                              sizes.single_real, "real", True, res))
        if "batch" in parts:
            part("batches, real", lambda: bench_batches(Site(work / "batch-real", real, args.workers),
                                                        sizes.batch_real, "real", res))

            def fast_batches(p: PebbleEnv) -> None:
                # The limit's 8-thread run before and after certd's batches: the reference is their mean.
                res.limit.pop("par_runs", None)
                bench_limit_parallel(p, sizes.limit_par, res)
                bench_batches(Site(work / f"batch-fast-{p.pebble_pid}", p, args.workers), sizes.batch_fast, "fast", res)
                bench_limit_parallel(p, sizes.limit_par, res)
            part("batches, fast", lambda: retried("batch", fast_batches))
        if "certbot" in parts:
            part("certbot", lambda: bench_certbot(real, work / "certbot", sizes.certbot, res))
        if "status" in parts:
            part("status without a daemon", lambda: bench_status(work / "status", sizes.status, res))
        if "footprint" in parts:
            for n in sizes.footprint:
                part(f"footprint {n}", lambda n=n: retried(f"footprint-{n}", lambda p, n=n: bench_footprint(  # type: ignore[misc]
                    Site(work / f"footprint-{n}-{p.pebble_pid}", p, args.workers), n, sizes.idle, res,
                    args.issue_workers, args.workers)))
    finally:
        for p in pebbles:
            p.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res.machine["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(res.__dict__, indent=2) + "\n")
    print(report(res, sizes))
    return 1 if res.failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks stop the servers
    sys.exit(main())
