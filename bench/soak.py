#!/usr/bin/env python3
"""Soak (issue 7): ``certd run`` unattended for a while, with everything that can go wrong
going wrong at random, and a client watching what is served the whole time.

- Pebble issues 3-minute certificates (default profile ``validityPeriod`` 180 s; real http-01
  validation) for 200 names, one certificate per name.
- One nginx (a server block per name) and one HAProxy (a ``crt`` directory of combined PEMs,
  hot-swapped over the runtime API) serve all names by SNI; every certificate has both reload
  hooks and both verify endpoints. The first certificates are issued together, so they all
  come due within seconds of each other: each renewal wave is a thundering herd of 200.
- A prober handshakes every name on both servers round-robin, all the time, verifying the
  chain against Pebble's root, the dates and the name; a completed TLS 1.3 handshake also
  proves the server holds the key of the certificate it sent.
- certd is SIGKILLed at random (on average every ``--kill-every`` seconds) and started again
  one second later, as systemd's ``Restart=always`` / ``RestartSec=1`` would.

At the end it prints: rotations done, probes made, probes that saw an expired, invalid or
mismatched certificate (target 0), missed rotations (a certificate still served after its
emergency point, a tenth of its lifetime before expiry; target 0), and the longest time any
served certificate stayed past its renewal point (half its lifetime, certd's default for
certificates shorter than 10 days). Pebble 2.10 offers a short certificate's whole lifetime as
its ARI window, and certd draws from it up to a fifth of the lifetime left, so with 2.10 that
last figure is informational: what must hold is 0 bad probes and 0 missed rotations.

Usage: .venv/bin/python bench/soak.py [--minutes 30] [--names 200] [--validity 180]
                                      [--kill-every SECONDS] [--seed N] [--workdir DIR] [--json]
``--minutes`` defaults to $CERTD_SOAK_MINUTES, else 30. Exit status: 0 when the targets are
met, 1 when not, 2 when the set-up failed. Everything runs on 127.0.0.1 in a temporary
directory; only processes the script started are ever signalled (by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certd.store.files import FileStore  # noqa: E402
from tests.support.certd_env import CertdEnv  # noqa: E402
from tests.support.pebble_fixtures import PebbleEnv  # noqa: E402
from tests.support.procs import ManagedProcess, free_port, wait_until  # noqa: E402
from tests.support.prober import BAD, ProbeResult, Target, TrustAnchors, probe_once  # noqa: E402
from tests.support.server_fixtures import HaproxyServer, NginxServer  # noqa: E402

RESTART_SEC = 1.0
DOMAIN = "{name}.soak.test"


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the daemon, supervised ---------------------------------------------------------------------


class Supervisor:
    """``certd run`` as systemd would run it with ``Restart=always`` and ``RestartSec=1``."""

    def __init__(self, env: CertdEnv, log_path: Path) -> None:
        self.env = env
        self.proc = ManagedProcess(env.argv("run"), log_path=log_path, cwd=ROOT, name="certd")
        self.kills = 0
        self.unexpected_exits = 0
        self.restarts = 0
        self._killed_pid: int | None = None

    def start(self) -> None:
        self.proc.start()
        self.proc.wait_ready(self._answers, timeout=120, what="control socket answering")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(self.env.socket))  # a stale socket left by a SIGKILL refuses
        return True

    def kill(self) -> None:
        if self.proc.alive:
            self._killed_pid = self.proc.pid
            self.proc.kill()
            self.kills += 1

    def keep_running(self) -> None:
        """Called in the main loop: restart a daemon that is gone, one second after it went."""
        if self.proc.alive:
            return
        if self.proc.pid != self._killed_pid:
            self.unexpected_exits += 1
            say(f"certd exited by itself (status {self.proc.returncode}); restarting")
        time.sleep(RESTART_SEC)
        self.restarts += 1
        self.start()

    def stop(self) -> int | None:
        return self.proc.stop(timeout=70)


# --- the prober ---------------------------------------------------------------------------------


@dataclass
class Watch:
    """What the prober learned. Times are epoch seconds."""

    counts: Counter[str] = field(default_factory=Counter)
    bad: list[ProbeResult] = field(default_factory=list)
    longest_overdue: float = 0.0                 # seconds a served certificate was past its renewal point
    longest_overdue_at: str = ""
    missed: set[tuple[str, str]] = field(default_factory=set)   # (name, serial) served past the emergency point
    serials: dict[str, set[str]] = field(default_factory=dict)  # name -> every serial seen served
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, result: ProbeResult) -> None:
        with self.lock:
            self.counts[result.category] += 1
            if result.category in BAD and len(self.bad) < 200:
                self.bad.append(result)
            info = result.info
            if not result.ok or info is None:
                return
            self.serials.setdefault(name, set()).add(info.serial)
            nb, na = info.not_before.timestamp(), info.not_after.timestamp()
            lifetime = na - nb
            overdue = result.at - (na - lifetime / 2)
            if overdue > self.longest_overdue:
                self.longest_overdue = overdue
                self.longest_overdue_at = f"{name} serial {info.serial} on {result.target.host}:{result.target.port}"
            if result.at > na - lifetime / 10:
                self.missed.add((name, info.serial))


def probe_forever(targets: list[tuple[str, Target]], anchors: TrustAnchors, watch: Watch,
                  stop: threading.Event, pause: float) -> None:
    i = 0
    while not stop.is_set():
        name, target = targets[i % len(targets)]
        i += 1
        watch.record(name, probe_once(target, anchors, timeout=5))
        if pause:
            stop.wait(pause)


# --- set-up -------------------------------------------------------------------------------------


def nginx_server_blocks(names: list[str], port: int, live: Path) -> str:
    blocks = []
    for name in names[1:]:
        blocks.append(f"""    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {DOMAIN.format(name=name)};
        ssl_certificate {live / name / 'fullchain.pem'};
        ssl_certificate_key {live / name / 'privkey.pem'};
        location / {{ return 200 "ok\\n"; }}
    }}""")
    return "\n".join(blocks)


def certificate(env: CertdEnv, name: str, live: Path, crt_dir: Path,
                servers: tuple[NginxServer, HaproxyServer] | None) -> dict[str, Any]:
    domain = DOMAIN.format(name=name)
    cert = env.http_cert(name, [domain],
                         deploy={"live_dir": str(live / name), "combined": str(crt_dir / f"{name}.pem")})
    if servers is not None:
        nginx, haproxy = servers
        cert["reload"] = [{"hook": "nginx", "config": str(nginx.config)},
                          {"hook": "haproxy", "socket": str(haproxy.socket), "crt": str(crt_dir / f"{name}.pem")}]
        cert["verify"] = [{"endpoint": f"127.0.0.1:{nginx.port}", "sni": domain, "ca_bundle": str(env.root_path)},
                          {"endpoint": f"127.0.0.1:{haproxy.port}", "sni": domain, "ca_bundle": str(env.root_path)}]
    return cert


def current_versions(state_dir: Path, names: list[str]) -> dict[str, int | None]:
    store = FileStore(state_dir)
    return {n: store.current(n) for n in names}


def log_counts(text: str) -> dict[str, int]:
    return {k: text.count(k) for k in ("rotation_committed", "rotation_rolled_back", "rotation_rollback_failed",
                                       "rotation_failed", "renewal_failed", "rotation_resumed", "daemon_ready")}


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("CERTD_SOAK_MINUTES") or 30))
    ap.add_argument("--names", type=int, default=200)
    ap.add_argument("--validity", type=int, default=180, help="certificate lifetime in seconds")
    ap.add_argument("--kill-every", type=float, default=None,
                    help="mean seconds between SIGKILLs of certd (default: 120, or a third of a short run)")
    ap.add_argument("--workers", type=int, default=64,
                    help="[daemon] workers: rotations in flight; each spends most of its time waiting for "
                         "the shared nginx reload, so 200 names renewing together need many")
    ap.add_argument("--probe-threads", type=int, default=2)
    ap.add_argument("--probe-pause", type=float, default=0.01,
                    help="seconds each prober thread rests between handshakes (leaves CPU to what is tested)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    kill_every = args.kill_every or min(120.0, args.minutes * 60 / 3)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="certd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        say(f"{work} is not empty: a soak starts from nothing (a new Pebble root, no certificates)")
        return 2
    names = [f"s{i:03d}" for i in range(args.names)]
    say(f"workdir {work}; {args.names} names, {args.validity} s certificates, {args.minutes:g} min, "
        f"SIGKILL every ~{kill_every:.0f} s, seed {seed}")

    pebble = PebbleEnv(work / "pebble", validity=args.validity)
    nginx: NginxServer | None = None
    haproxy: HaproxyServer | None = None
    supervisor: Supervisor | None = None
    stop_probes = threading.Event()
    probe_threads: list[threading.Thread] = []
    try:
        try:
            pebble.start()
            env = CertdEnv(work, pebble)
            env.refresh_root()
            env.daemon_extra["workers"] = args.workers
            live, crt_dir = work / "live", work / "haproxy-certs"
            crt_dir.mkdir(exist_ok=True)

            # 1. First certificates for every name, issued by the daemon (no servers yet).
            started = time.monotonic()
            env.write_config([certificate(env, n, live, crt_dir, None) for n in names])
            # Not beside certd.toml: the daemon watches that directory for config edits, and
            # would wake up for every line it logs.
            supervisor = Supervisor(env, work / "logs" / "certd.log")
            supervisor.start()
            wait_until(lambda: all(v is not None for v in current_versions(env.state_dir, names).values()),
                       timeout=60 + args.names * 3, interval=1, what="a first certificate for every name")
            supervisor.stop()
            say(f"issued {args.names} first certificates in {time.monotonic() - started:.1f} s")

            # 2. One nginx and one HAProxy serving every name; certd reloads and verifies both.
            port = free_port()
            (work / "nginx").mkdir(exist_ok=True)
            nginx = NginxServer(work / "nginx", port,
                                live / names[0] / "fullchain.pem", live / names[0] / "privkey.pem",
                                server_name=DOMAIN.format(name=names[0]), extra="",
                                extra_http=nginx_server_blocks(names, port, live)).start()
            (work / "haproxy").mkdir(exist_ok=True)
            haproxy = HaproxyServer(work / "haproxy", free_port(), crt_dir, extra_bind="").start()
            env.write_config([certificate(env, n, live, crt_dir, (nginx, haproxy)) for n in names])
        except Exception as e:  # noqa: BLE001 - a set-up failure is not a soak result
            say(f"set-up failed: {type(e).__name__}: {e}")
            return 2

        # 3. The soak: daemon under its supervisor, prober, random SIGKILLs.
        anchors = TrustAnchors(env.root_path)
        watch = Watch()
        targets = [(n, Target("127.0.0.1", s.port, DOMAIN.format(name=n))) for n in names for s in (nginx, haproxy)]
        for k in range(args.probe_threads):
            t = threading.Thread(target=probe_forever, args=(targets[k::args.probe_threads], anchors, watch,
                                                             stop_probes, args.probe_pause), daemon=True)
            t.start()
            probe_threads.append(t)
        before = current_versions(env.state_dir, names)
        supervisor.start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_kill = t0 + kill_every * rng.uniform(0.5, 1.5)
        next_report = t0 + 30
        while (now := time.monotonic()) < end:
            if now >= next_kill:
                supervisor.kill()
                say(f"SIGKILLed certd (kill {supervisor.kills})")
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            supervisor.keep_running()
            if now >= next_report:
                with watch.lock:
                    probes, nbad = sum(watch.counts.values()), len(watch.bad)
                rotations = sum((v or 0) - (before[n] or 0) for n, v in current_versions(env.state_dir, names).items())
                say(f"{(now - t0) / 60:.1f} min: {rotations} rotations, {probes} probes, {nbad} bad, "
                    f"{len(watch.missed)} missed, longest past renewal point {watch.longest_overdue:.1f} s")
                next_report = now + 30
            time.sleep(0.1)
        stop_probes.set()
        for t in probe_threads:
            t.join(timeout=30)
        status = supervisor.stop()

        # 4. The figures.
        after = current_versions(env.state_dir, names)
        store = FileStore(env.state_dir)
        now_epoch = time.time()
        stale = []   # certificates whose current version is past its emergency point right now
        for n in names:
            version = after[n]
            info = store.load(n, version).bundle.info if version is not None else None
            if info is None or now_epoch > info.not_after.timestamp() - (info.lifetime_seconds / 10):
                stale.append(n)
        counts = log_counts(supervisor.proc.log_text())
        bad = list(watch.bad)
        summary = {
            "minutes": args.minutes, "names": args.names, "validity_seconds": args.validity, "seed": seed,
            "rotations": sum((after[n] or 0) - (before[n] or 0) for n in names),
            "probes": sum(watch.counts.values()),
            "probe_categories": dict(watch.counts),
            "bad_probes": len(bad),
            "missed_rotations": len(watch.missed) + len(stale),
            "longest_past_renewal_point_seconds": round(watch.longest_overdue, 2),
            "longest_past_renewal_point_where": watch.longest_overdue_at,
            "certd_sigkills": supervisor.kills,
            "certd_unexpected_exits": supervisor.unexpected_exits,
            "certd_final_exit_status": status,
            "log": counts,
            "workdir": str(work),
        }
        (work / "soak-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        ok = not bad and not watch.missed and not stale and supervisor.unexpected_exits == 0 and status == 0
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"soak: {args.minutes:g} min, {args.names} names on {args.validity} s certificates, "
                  f"nginx + HAProxy, certd SIGKILLed {supervisor.kills} times")
            print(f"  rotations done:                         {summary['rotations']}")
            print(f"  probes made:                            {summary['probes']}  {dict(watch.counts)}")
            print(f"  probes seeing expired/invalid/mismatch: {len(bad)}  (target 0)")
            print(f"  missed rotations:                       {summary['missed_rotations']}  (target 0)")
            print(f"  longest past a renewal point:           {watch.longest_overdue:.1f} s "
                  f"({watch.longest_overdue_at})")
            print(f"  certd log: {counts['rotation_committed']} committed, "
                  f"{counts['rotation_rolled_back']} rolled back, "
                  f"{counts['renewal_failed']} failed attempts, "
                  f"{counts['rotation_resumed']} rotations resumed after a kill, "
                  f"{supervisor.unexpected_exits} unexpected exits, final exit status {status}")
            for r in bad[:10]:
                print(f"  BAD {r.category} {r.target}: {r.detail}")
            for n, serial in sorted(watch.missed)[:10]:
                print(f"  MISSED {n} serial {serial} served past its emergency point")
            for n in stale[:10]:
                print(f"  MISSED {n}: the current certificate is past its emergency point at the end")
            print("soak: " + ("targets met" if ok else "TARGETS MISSED"))
        return 0 if ok else 1
    finally:
        stop_probes.set()
        if supervisor is not None and supervisor.proc.alive:
            supervisor.proc.kill()
        for server in (haproxy, nginx):
            if server is not None:
                server.stop()
        pebble.stop()


if __name__ == "__main__":
    # SIGTERM (CI's timeout, kill PID) stops like ^C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
