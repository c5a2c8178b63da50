#!/usr/bin/env python3
"""Fleet soak (issue 17): three ``certd run`` nodes on one PostgreSQL, unattended, with nodes
SIGKILLed at random and the database restarted once, and a client watching every node.

- A private PostgreSQL cluster (tests.support.postgres), Pebble 2.10 issuing 3-minute
  certificates (its ``default`` profile's ``validityPeriod``; real http-01 validation) behind the
  order-counting proxy (tests.support.hostile_ca), and a round-robin TCP proxy on Pebble's http-01
  port standing in for the load balancer: a challenge is often answered by a node that did not
  order (from the database's shared answers).
- Three nodes, each a real ``certd run`` process with its own state dir, control socket, its own
  nginx (a server block per name, deploy files per name) with the nginx reload hook and a verify
  endpoint, ``[cluster] reconcile_interval`` 5 s, one shared KEK. 50 names, one certificate each.
  ``order_timeout`` is 10 s, so a dead node's lease lapses after 45 s (``fleet_ttl``).
- A prober handshakes every name on every node's nginx round-robin, all the time, verifying the
  chain against Pebble's root, the dates and the name; a completed TLS 1.3 handshake also proves
  the server holds the key of the certificate it sent.
- A node chosen at random is SIGKILLed (on average every ``--kill-every`` seconds) and started
  again a second later, as systemd's ``Restart=always`` would; halfway through, PostgreSQL is
  stopped (fast shutdown) and started again ``--pg-down`` seconds later (a failover's gap). No
  node is killed during the outage; one that died just before it is restarted once it is over
  (a node cannot start without its database; systemd would retry it every ``RestartSec``).
- At the end every node gets SIGTERM (in-flight rotations reach a safe point), so nothing ordered
  is still uncommitted when orders are counted.

Targets (exit 1 when one is missed): 0 bad probes (an expired, untrusted, misnamed certificate
or a failed handshake: a cert/key mismatch); 0 missed rotations (a certificate served by any node
past its emergency point, a tenth of its lifetime before expiry, or any node's applied version
past it at the end; a node with no applied version recorded then — another node adopted the
rotation a SIGKILL interrupted on it and it has not re-applied yet — is judged by what it
serves, by a handshake); orders = renewals (newOrders Pebble accepted during the soak = ``renewed``
audit records, one per committed renewal, plus the orders the CA itself invalidated because a
validation failed — each one a ``renewal_failed`` record whose problem the CA answered at the
challenge, as when the node answering the validation is SIGKILLed under it: a new order is the
only way on after an invalid authorization, RFC 8555 §7.1.6), and certificates finalized =
renewals (no second certificate for one renewal); every node's exit status 0 and no exit nobody
caused.

Pebble 2.10 offers a short certificate's whole lifetime as its ARI window, and certd draws from
it up to a third of the lifetime left (core/policy.py): 60 s before expiry for these certificates,
while a SIGKILLed node's lease, the fleet's protection against two orders, lapses only after 45 s.
The CA proxy therefore hides ``renewalInfo`` by default (renewals at ``renew_before``, half the
lifetime); ``--ari`` keeps it (a real CA's window sits near two thirds of a 90-day lifetime,
where a 45 s lease is nothing).

Without ``--rollout`` every node applies the desired version as it moves. ``--rollout TOML`` adds
lines to every certificate's ``[certificate.rollout]`` table (e.g. ``--rollout 'canaries = 1'``):
each renewal then runs as a release, canaries first (issue 17 items 1-3).

Usage: .venv/bin/python bench/fleetsoak.py [--minutes 3] [--names 50] [--validity 180]
                                           [--kill-every S] [--pg-down S] [--seed N] [--json]
``--minutes`` defaults to $CERTD_FLEET_SOAK_MINUTES, else 3. Exit status: 0 targets met, 1 not,
2 set-up failed. Everything runs on 127.0.0.1 in a temporary directory; only processes this
script started are ever signalled (by PID).
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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certd.config import load  # noqa: E402
from certd.core.errors import CertdError  # noqa: E402
from certd.store.opening import open_cluster  # noqa: E402
from certd.store.pg import PgStore  # noqa: E402
from soak import DOMAIN, Watch, nginx_server_blocks, probe_forever  # noqa: E402
from tests.integration.test_faults import add_root  # noqa: E402
from tests.support.certd_env import CertdEnv  # noqa: E402
from tests.support.hostile_ca import HostileCA  # noqa: E402
from tests.support.pebble_fixtures import PebbleEnv  # noqa: E402
from tests.support.postgres import PgCluster, start_cluster  # noqa: E402
from tests.support.procs import ManagedProcess, free_port, wait_until  # noqa: E402
from tests.support.prober import TrustAnchors, Target, probe_once  # noqa: E402
from tests.support.rrproxy import RoundRobinProxy  # noqa: E402
from tests.support.server_fixtures import NginxServer, TestCA, _start_with_retries  # noqa: E402

RESTART_SEC = 1.0


def say(message: str) -> None:
    print(f"[fleetsoak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_secret(path: Path, data: bytes) -> None:
    """``data`` into ``path``, 0600 from the first byte (a private key, the KEK)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class SoakNode:
    """One node: its certd config, nginx, deploy files, and ``certd run`` as systemd would run it."""

    def __init__(self, name: str, base: Path, pebble: PebbleEnv, names: list[str], placeholder: Any) -> None:
        self.name, self.names = name, names
        self.env = CertdEnv(base / name, pebble)
        self.files = self.env.dir / "tls"
        for n in names:  # nginx needs something to serve before the first issuance
            (self.files / n).mkdir(parents=True, mode=0o700)
            (self.files / n / "fullchain.pem").write_bytes(placeholder.fullchain_pem)
            write_secret(self.files / n / "privkey.pem", placeholder.key_pem)
        (self.env.dir / "nginx").mkdir()
        first = self.files / names[0]
        self.nginx: NginxServer = _start_with_retries(  # type: ignore[assignment]
            lambda port: NginxServer(self.env.dir / "nginx", port, first / "fullchain.pem", first / "privkey.pem",
                                     server_name=DOMAIN.format(name=names[0]), extra="",
                                     extra_http=nginx_server_blocks(names, port, self.files)), None)
        self.proc = ManagedProcess(self.env.argv("run"), log_path=base / "logs" / f"{name}.log", cwd=ROOT, name=name)
        self.kills = self.unexpected_exits = self.restarts = 0
        self.peak_rss_kb = 0
        self._killed_pid: int | None = None
        self._down_since: float | None = None

    def configure(self, http_port: int, directory: str, dsn: str, kek: Path, roots: Path, workers: int,
                  rollout: str | None) -> None:
        self.env.daemon_extra = {"workers": workers}
        self.env.acme_extra = {"directory": directory, "order_timeout": "10s"}
        self.env.tables = {"keys": {"kek_file": str(kek)},
                           "cluster": {"database": dsn, "node": self.name, "reconcile_interval": "5s"}}
        certs = []
        for n in self.names:
            domain, files = DOMAIN.format(name=n), self.files / n
            certs.append({"name": n, "domains": [domain], "challenge": "http-01",
                          "http01_listen": f"127.0.0.1:{http_port}",
                          "deploy": {"files": [{"path": str(files / "fullchain.pem"), "content": "fullchain"},
                                               {"path": str(files / "privkey.pem"), "content": "privkey"}]},
                          "reload": [{"hook": "nginx", "config": str(self.nginx.config)}],
                          "verify": [{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": domain,
                                      "ca_bundle": str(roots)}],
                          "verify_timeout": "5s"})
        self.env.write_config(certs)
        if rollout:  # [certificate.rollout] once the release lands: a sub-table after each certificate
            text = self.env.config_path.read_text()
            text = text.replace("[[certificate.reload]]", f"[certificate.rollout]\n{rollout}\n[[certificate.reload]]")
            self.env.config_path.write_text(text)

    def start(self) -> None:
        self.proc.start()
        self.proc.wait_ready(self._answers, timeout=120, what="control socket answering")
        self._down_since = None

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

    def keep_running(self, db_up: bool) -> None:
        """Called in the main loop: start a node that is gone again, a second after it went
        (and only while the database answers: without it certd exits at once)."""
        if self.proc.alive:
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            if self.proc.pid != self._killed_pid:
                self.unexpected_exits += 1
                say(f"{self.name} exited by itself (status {self.proc.returncode})")
        if db_up and now - self._down_since >= RESTART_SEC:
            self.restarts += 1
            self.start()

    def sample_rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass


class Fleet:
    """Everything the soak started, and what it reads from the database."""

    def __init__(self, work: Path, args: argparse.Namespace, names: list[str]) -> None:
        self.work, self.args, self.names = work, args, names
        self.cluster: PgCluster | None = None
        self.pebble = PebbleEnv(work / "pebble", validity=args.validity)
        self.ca: HostileCA | None = None
        self.proxy: RoundRobinProxy | None = None
        self.nodes: list[SoakNode] = []
        self.store: PgStore | None = None
        self.roots = work / "roots.pem"
        self.db_up = True

    def build(self) -> None:
        self.cluster = start_cluster()
        self.pebble.start()
        self.ca = HostileCA(self.pebble, self.work).start()
        self.ca.hide_ari = not self.args.ari
        add_root(self.roots, self.pebble)
        kek = self.work / "kek"
        write_secret(kek, os.urandom(32))  # the fleet's KEK (`certd kek init`), the same on every node
        placeholder = TestCA(self.work / "placeholder-ca", "placeholder").issue("placeholder.soak.test")
        self.nodes = [SoakNode(f"node{i + 1}", self.work, self.pebble, self.names, placeholder)
                      for i in range(self.args.nodes)]
        ports: set[int] = set()
        while len(ports) < len(self.nodes):  # after every nginx is up; never Pebble's own ports
            ports.add(free_port())
            ports -= {self.pebble.http_port, self.pebble.tls_port}
        dsn = self.cluster.database()
        for node, port in zip(self.nodes, sorted(ports)):
            node.configure(port, self.ca.directory_url, dsn, kek, self.roots, self.args.workers, self.args.rollout)
        self.proxy = RoundRobinProxy(("127.0.0.1", self.pebble.http_port),
                                     [("127.0.0.1", p) for p in sorted(ports)]).start()
        self.store = open_cluster(load(self.nodes[0].env.config_path))

    def versions(self) -> tuple[dict[str, int | None], dict[str, dict[str, int | None]]]:
        """Desired version per name; applied version per node and name."""
        assert self.store is not None
        desired = {n: self.store.desired(n) for n in self.names}
        applied = {node.name: {n: self.store.applied(node.name, n) for n in self.names} for node in self.nodes}
        return desired, applied

    def converged(self) -> bool:
        desired, applied = self.versions()
        return all(v is not None for v in desired.values()) and all(a == desired for a in applied.values())

    def audit(self) -> list[dict[str, Any]]:
        assert self.store is not None
        return list(self.store.audit.records)

    def restart_database(self) -> float:
        """Fast shutdown, ``--pg-down`` seconds down, start again; the seconds it was down."""
        assert self.cluster is not None
        started = time.monotonic()
        self.db_up = False
        self.cluster.stop()
        time.sleep(self.args.pg_down)  # the outage itself: no one waits for anything here
        self.cluster.start()
        self.db_up = True
        return time.monotonic() - started

    def stop_nodes(self) -> dict[str, int | None]:
        """SIGTERM every node at once (each finishes in-flight rotations), their exit statuses."""
        statuses: dict[str, int | None] = {}

        def stop(node: SoakNode) -> None:
            statuses[node.name] = node.proc.stop(timeout=70)

        threads = [threading.Thread(target=stop, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statuses

    def teardown(self) -> None:
        steps: list[Callable[[], object]] = [n.proc.kill for n in self.nodes]
        steps += [n.nginx.stop for n in self.nodes]
        steps += [x.close for x in (self.store,) if x is not None] + [x.stop for x in (self.proxy, self.ca) if x]
        steps += [self.pebble.stop] + [x.destroy for x in (self.cluster,) if x is not None]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - tear down the rest regardless
                say(f"teardown: {type(e).__name__}: {e}")


def soak(fleet: Fleet, rng: random.Random, watch: Watch) -> dict[str, Any]:
    """The soak's main loop: kills, one database restart, progress lines. Returns its events."""
    args = fleet.args
    kill_every = args.kill_every or min(60.0, args.minutes * 60 / 4)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    pg_at = t0 + args.minutes * 60 / 2
    pg_down_for: float | None = None
    next_kill = t0 + kill_every * rng.uniform(0.5, 1.5)
    next_report = t0 + 30
    kills: list[str] = []
    orders0 = len(fleet.ca.orders_created) if fleet.ca else 0
    while (now := time.monotonic()) < end:
        if pg_down_for is None and now >= pg_at:
            say("stopping PostgreSQL")
            pg_down_for = fleet.restart_database()
            say(f"PostgreSQL back after {pg_down_for:.1f} s")
            next_kill = max(next_kill, time.monotonic() + 10)  # no kill in the outage's shadow
        elif now >= next_kill and not (pg_down_for is None and pg_at - 5 <= now):
            node = rng.choice(fleet.nodes)
            node.kill()
            kills.append(f"{now - t0:.0f}s:{node.name}")
            say(f"SIGKILLed {node.name} (kill {len(kills)})")
            next_kill = now + kill_every * rng.uniform(0.5, 1.5)
        for node in fleet.nodes:
            node.keep_running(fleet.db_up)
            node.sample_rss()
        if now >= next_report:
            with watch.lock:
                probes, nbad = sum(watch.counts.values()), len(watch.bad)
            say(f"{(now - t0) / 60:.1f} min: {probes} probes, {nbad} bad, {len(watch.missed)} missed, "
                f"{(len(fleet.ca.orders_created) if fleet.ca else 0) - orders0} orders")
            next_report = now + 30
        time.sleep(0.1)
    return {"kills": kills, "pg_down_seconds": round(pg_down_for or 0.0, 1)}


def stale_at(fleet: Fleet, applied: dict[str, dict[str, int | None]], at: float,
             anchors: TrustAnchors) -> tuple[list[str], list[str]]:
    """``node/name`` whose applied version is past its emergency point at ``at`` (epoch s),
    and ``node/name`` with no applied version recorded then. A node's applied row is dropped
    when another node adopts the rotation a SIGKILL interrupted on it (certd/engine/adopt.py;
    it re-applies the desired version once it is back): for those what the node serves, by a
    handshake now, decides — stale unless it serves a trusted certificate short of its
    emergency point."""
    assert fleet.store is not None
    stale, unrecorded = [], []
    ports = {node.name: node.nginx.port for node in fleet.nodes}
    for node, versions in applied.items():
        for n, version in versions.items():
            if version is None:
                unrecorded.append(f"{node}/{n}")
                served = probe_once(Target("127.0.0.1", ports[node], DOMAIN.format(name=n)), anchors, timeout=5)
                info = served.info if served.ok else None
            else:
                info = fleet.store.load_info(n, version).info
            if info is None or at > info.not_after.timestamp() - info.lifetime_seconds / 10:
                stale.append(f"{node}/{n}")
    return stale, unrecorded


def _epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


def convergence(records: list[dict[str, Any]], nodes: int) -> dict[str, Any]:
    """Seconds from each renewal's commit (its ``renewed`` record) to the last of the other
    nodes applying it (``node_applied`` success): p50, p95, max, and renewals some node never
    applied before the end (a later version overtook it, or the soak ended first)."""
    committed = {(r["name"], r["version"]): _epoch(r) for r in records if r["event"] == "renewed"}
    applied: dict[tuple[str, int], dict[str, float]] = {}  # each node's FIRST apply: a re-apply after
    for r in records:                                        # a SIGKILL is not how long the first took
        if r["event"] == "node_applied" and r.get("outcome") == "success":
            first = applied.setdefault((r["name"], r["version"]), {})
            node = str((r.get("detail") or {}).get("node"))
            first[node] = min(first.get(node, _epoch(r)), _epoch(r))
    lags = sorted(max(applied[k].values()) - t for k, t in committed.items()
                  if len(applied.get(k, {})) >= nodes - 1)
    if not lags:
        return {"p50": None, "p95": None, "max": None, "not_everywhere": len(committed)}
    return {"p50": round(lags[len(lags) // 2], 1), "p95": round(lags[min(len(lags) - 1, int(len(lags) * 0.95))], 1),
            "max": round(lags[-1], 1), "not_everywhere": len(committed) - len(lags)}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    if not v:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": round(v[len(v) // 2], 1), "p95": round(v[min(len(v) - 1, int(len(v) * 0.95))], 1),
            "max": round(v[-1], 1)}


def release_times(records: list[dict[str, Any]]) -> dict[str, Any]:
    """With ``--rollout``: seconds from each release's opening (the renewal stored its version,
    canaries first) to its promotion (the canaries proved it; the desired version moves) and to
    ``done`` (every node applied it) — canary to fleet; and how many releases ended otherwise."""
    opened = {(r["name"], r["version"]): _epoch(r) for r in records if r["event"] == "release_opened"}
    steps: dict[tuple[str, int], dict[str, float]] = {}
    for r in records:
        if r["event"] == "release_step":
            steps.setdefault((r["name"], r["version"]), {}).setdefault(str(r.get("outcome")), _epoch(r))
    def since_open(state: str) -> list[float]:
        return [s[state] - opened[k] for k, s in steps.items() if k in opened and state in s]
    return {"opened": len(opened), "canary_to_promoted": _percentiles(since_open("promoted")),
            "canary_to_fleet_done": _percentiles(since_open("done")),
            "done": sum(1 for s in steps.values() if "done" in s),
            "aborted": sum(1 for r in records if r["event"] == "release_aborted"),
            "rolled_back": sum(1 for r in records if r["event"] == "release_rolled_back")}


def log_counts(text: str) -> dict[str, int]:
    keys = ("rotation_committed", "renewal_failed", "orphaned_order", "node_applied", "fleet_unreachable",
            "lease_lost", "rotation_resumed", "daemon_ready")
    return {k: text.count(k) for k in keys}


def run(fleet: Fleet, rng: random.Random, seed: int) -> tuple[bool, dict[str, Any]]:
    """Issue, soak, stop, count. The summary and whether every target was met."""
    args, names = fleet.args, fleet.names
    assert fleet.ca is not None
    started = time.monotonic()
    for node in fleet.nodes:
        node.start()
    wait_until(fleet.converged, timeout=90 + len(names) * 3, interval=1,
               what="a first certificate for every name, applied on every node")
    say(f"issued {len(names)} first certificates, applied on {len(fleet.nodes)} nodes, in "
        f"{time.monotonic() - started:.1f} s")
    orders0, finalized0 = len(fleet.ca.orders_created), len(fleet.ca.finalized)
    seq0 = max((int(r["seq"]) for r in fleet.audit()), default=0)
    desired0, _ = fleet.versions()

    watch, stop_probes = Watch(), threading.Event()
    anchors = TrustAnchors(fleet.roots)
    targets = [(f"{n}@{node.name}", Target("127.0.0.1", node.nginx.port, DOMAIN.format(name=n)))
               for n in names for node in fleet.nodes]
    probers = [threading.Thread(target=probe_forever, args=(targets[k::args.probe_threads], anchors, watch,
                                                           stop_probes, args.probe_pause), daemon=True)
               for k in range(args.probe_threads)]
    for t in probers:
        t.start()
    try:
        events = soak(fleet, rng, watch)
    finally:
        stop_probes.set()
        for t in probers:
            t.join(timeout=30)
    stopped_at = time.time()
    _, applied_at_stop = fleet.versions()
    stale, unrecorded = stale_at(fleet, applied_at_stop, stopped_at, anchors)
    statuses = fleet.stop_nodes()

    desired, applied = fleet.versions()
    records = [r for r in fleet.audit() if int(r["seq"]) > seq0]
    # a renewal commits (``renewed``), or with --rollout stores its version and opens a release
    renewed = [r for r in records if r["event"] in ("renewed", "release_opened")]
    failed_applies = [r for r in records if r["event"] == "node_applied" and r.get("outcome") != "success"]
    invalidated = [r for r in records if r["event"] == "renewal_failed"
                   and (r.get("detail") or {}).get("where") == "challenge"]
    orders, finalized = len(fleet.ca.orders_created) - orders0, len(fleet.ca.finalized) - finalized0
    bad = list(watch.bad)
    unexpected = sum(n.unexpected_exits for n in fleet.nodes)
    summary: dict[str, Any] = {
        "minutes": args.minutes, "nodes": len(fleet.nodes), "names": len(names), "validity_seconds": args.validity,
        "seed": seed, "ari": args.ari,
        "renewals": len(renewed),
        "desired_version_moves": sum((desired[n] or 0) - (desired0[n] or 0) for n in names),
        "orders": orders, "finalized": finalized,
        "orders_invalidated_by_validation": len(invalidated),
        "probes": sum(watch.counts.values()), "probe_categories": dict(watch.counts),
        "bad_probes": len(bad),
        "missed_rotations": len(watch.missed) + len(stale),
        "applied_unrecorded_at_end": unrecorded,
        "nodes_converged_at_end": all(a == desired for a in applied.values()),
        "failed_node_applies": len(failed_applies),
        "commit_to_every_node_seconds": convergence(records, len(fleet.nodes)),
        "releases": release_times(records) if args.rollout else None,
        "longest_past_renewal_point_seconds": round(watch.longest_overdue, 2),
        "longest_past_renewal_point_where": watch.longest_overdue_at,
        "sigkills": events["kills"], "pg_down_seconds": events["pg_down_seconds"],
        "unexpected_exits": unexpected, "exit_statuses": statuses,
        "peak_rss_mb": {n.name: round(n.peak_rss_kb / 1024) for n in fleet.nodes},
        "log": {n.name: log_counts(n.proc.log_text()) for n in fleet.nodes},
        "workdir": str(fleet.work),
    }
    summary["_detail"] = {"bad": [f"{r.category} {r.target}: {r.detail}" for r in bad[:10]],
                          "missed": [f"{k} serial {s}" for k, s in sorted(watch.missed)[:10]] + stale[:10],
                          "failed_applies": [f"{r['name']} v{r.get('version')} {r.get('detail', {}).get('node')}: "
                                             f"{r.get('reason')}" for r in failed_applies[:5]],
                          "unrecorded_renewals": unrecorded_renewals(names, desired0, desired, renewed, records),
                          "invalidated": [f"{r['name']} at {r.get('time')}: {r['detail'].get('problem')}"
                                          for r in invalidated[:5]]}
    ok = (not bad and not watch.missed and not stale and orders == len(renewed) + len(invalidated)
          and finalized == len(renewed) and unexpected == 0
          and all(s == 0 for s in statuses.values()))
    return ok, summary


def unrecorded_renewals(names: list[str], desired0: dict[str, int | None], desired: dict[str, int | None],
                        renewed: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """Each name whose desired version moved more often than it has renewal records, with its
    audit trail (event, version, initiator): where to start reading the nodes' logs when
    renewals and orders disagree."""
    out = []
    for n in names:
        moves = (desired[n] or 0) - (desired0[n] or 0)
        if moves != sum(1 for r in renewed if r["name"] == n):
            trail = [f"{r['event']}@{r.get('time', '')[11:19]} v{r.get('version')} {r.get('initiator')}"
                     for r in records if r["name"] == n and r["event"] not in ("node_applied", "deployed",
                                                                                "verified", "version_pruned")]
            out.append(f"{n} moved {moves}: {'; '.join(trail)}")
    return out[:10]


def report(ok: bool, s: dict[str, Any]) -> None:
    print(f"fleet soak: {s['minutes']:g} min, {s['nodes']} nodes x {s['names']} names on {s['validity_seconds']} s "
          f"certificates (ARI {'on' if s['ari'] else 'hidden'}), seed {s['seed']}")
    print(f"  renewals (audit 'renewed'/'release_opened'): {s['renewals']}  (desired versions moved "
          f"{s['desired_version_moves']})")
    print(f"  orders at the CA / certificates finalized:   {s['orders']} / {s['finalized']}  "
          f"(targets: orders = renewals + orders invalidated by a failed validation "
          f"({s['orders_invalidated_by_validation']}), finalized = renewals)")
    print(f"  probes (TLS handshakes, every node, name):   {s['probes']}  {s['probe_categories']}")
    print(f"  bad probes (expired/untrusted/name/handshake): {s['bad_probes']}  (target 0)")
    print(f"  missed rotations (past emergency point):     {s['missed_rotations']}  (target 0)")
    if s["applied_unrecorded_at_end"]:
        print(f"  no applied version recorded at the end (judged by a handshake): "
              f"{', '.join(s['applied_unrecorded_at_end'][:10])}")
    print(f"  longest a served cert was past renewal point: {s['longest_past_renewal_point_seconds']} s "
          f"({s['longest_past_renewal_point_where']}; the emergency point is 40 % of the lifetime later)")
    print(f"  SIGKILLs {len(s['sigkills'])} ({', '.join(s['sigkills'])}); PostgreSQL down "
          f"{s['pg_down_seconds']} s; unexpected exits {s['unexpected_exits']}; exit statuses {s['exit_statuses']}")
    c = s["commit_to_every_node_seconds"]
    print(f"  commit -> every other node applied (audit):  p50 {c['p50']} s, p95 {c['p95']} s, max {c['max']} s "
          f"({c['not_everywhere']} renewals not applied everywhere by the end)")
    if s["releases"]:
        r = s["releases"]
        print(f"  releases opened {r['opened']}, done {r['done']}, aborted {r['aborted']}, rolled back "
              f"{r['rolled_back']}; open -> promoted {r['canary_to_promoted']}; canary -> fleet done "
              f"{r['canary_to_fleet_done']} (s)")
    print(f"  every node on the desired version at the end: {s['nodes_converged_at_end']}; failed node applies "
          f"{s['failed_node_applies']}; peak RSS MB {s['peak_rss_mb']}")
    for node, counts in s["log"].items():
        print(f"  {node} log: {counts}")
    for kind, lines in s["_detail"].items():
        for line in lines:
            print(f"  {kind.upper()} {line}")
    print("fleet soak: " + ("targets met" if ok else "TARGETS MISSED"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("CERTD_FLEET_SOAK_MINUTES") or 3))
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--names", type=int, default=50)
    ap.add_argument("--validity", type=int, default=180, help="certificate lifetime in seconds")
    ap.add_argument("--kill-every", type=float, default=None,
                    help="mean seconds between SIGKILLs of a node (default: 60, or a quarter of a short run)")
    ap.add_argument("--pg-down", type=float, default=5.0, help="seconds PostgreSQL stays down halfway through")
    ap.add_argument("--ari", action="store_true", help="let the nodes see Pebble's ARI window (see above)")
    ap.add_argument("--workers", type=int, default=16, help="[daemon] workers of each node")
    ap.add_argument("--rollout", default=None, help="lines for each [certificate.rollout] (once releases exist)")
    ap.add_argument("--probe-threads", type=int, default=2)
    ap.add_argument("--probe-pause", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="certd-fleetsoak-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        say(f"{work} is not empty: a soak starts from nothing (a new Pebble root, no certificates)")
        return 2
    names = [f"f{i:03d}" for i in range(args.names)]
    say(f"workdir {work}; {args.nodes} nodes, {args.names} names, {args.validity} s certificates, "
        f"{args.minutes:g} min, seed {seed}")
    fleet = Fleet(work, args, names)
    try:
        try:
            fleet.build()
        except Exception as e:  # noqa: BLE001 - a set-up failure is not a soak result
            say(f"set-up failed: {type(e).__name__}: {e}")
            return 2
        try:
            ok, summary = run(fleet, random.Random(seed), seed)
        except (CertdError, TimeoutError) as e:
            for node in fleet.nodes:
                say(f"--- {node.name}: the end of its log\n{node.proc.log_tail(25)}")
            say(f"fleet soak failed before its figures: {type(e).__name__}: {e}")
            return 1
        (work / "fleetsoak-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            report(ok, summary)
        return 0 if ok else 1
    finally:
        fleet.teardown()


if __name__ == "__main__":
    # SIGTERM (CI's timeout, kill PID) stops like ^C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
