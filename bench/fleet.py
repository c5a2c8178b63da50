#!/usr/bin/env python3
"""Fleet convergence benchmark (issue 16): how long after a renewal commits every node serves it.

Set-up, all on loopback, as tests/integration/test_fleet.py builds it (its Node and Fleet are
imported, not copied): a private PostgreSQL cluster (tests.support.postgres), Pebble behind the
order-counting proxy (tests.support.hostile_ca), a round-robin proxy standing in for the load
balancer on Pebble's http-01 port, and three ``certd run`` nodes, each with its own nginx, deploy
files, reload hook and verify endpoint, ``reconcile_interval`` 3 s.

Then N forced renewals (default 10), each ``certd renew www --force --wait`` on the next node in
turn (``--ignore-duplicate-limit``: N renewals of one name are over Let's Encrypt's 5 a week,
which certd counts fleet-wide). A prober thread handshakes with every node's nginx continuously
and records when each first served each fingerprint. Per renewal:

  convergence   the last node's first handshake with the new certificate, minus the commit
                (the ``renewed`` audit record's time; the ordering node already serves it then)
  orders        orders created at the CA for it (must be exactly 1)

Printed: p50/p95/max convergence, against the issue's target (<= 2 s on loopback), and the
orders per renewal, each ok or MISSED.

With ``--rollout 'canaries = 1'`` (any ``[certificate.rollout]`` body, issue 17) every renewal
is a release: the canaries deploy and verify first, then the desired version moves. Printed
per renewal and as p50/p95 (audit times): release opened -> promoted (the canary step),
promoted -> done (the fleet step), opened -> done (canary to fleet), and opened -> every node
serving it (the prober); "convergence" is then counted from the release's opening.

``--wave N`` (with ``--rollout``) adds N certificates to every node (``wave1`` ..., each in a
server block of the node's nginx, reloaded and verified by handshake as in the fleet soak) and,
once all are issued, force-renews them all in one ``certd renew`` on node1: N releases open within seconds
of each other, as a renewal wave does in the fleet soak. Printed: the same release steps over
the N releases (audit times), p50/p95/max.

Usage: .venv/bin/python bench/fleet.py [--renewals N] [--rollout TOML] [--wave N]
       (or: bash bench/run.sh --only fleet)
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soak import DOMAIN, nginx_server_blocks  # noqa: E402  (bench/, on the path as the script's directory)
from tests.integration.test_faults import add_root  # noqa: E402
from tests.support.hostile_ca import HostileCA  # noqa: E402
from tests.support.pebble_fixtures import PebbleEnv  # noqa: E402
from tests.support.postgres import start_cluster  # noqa: E402
from tests.support.procs import free_port, wait_until  # noqa: E402
from tests.support.rrproxy import RoundRobinProxy  # noqa: E402
from tests.support.server_fixtures import NginxServer, TestCA, _start_with_retries  # noqa: E402

# The fleet tests' Node and Fleet (not type-checked: mypy covers certd and bench, not the tests).
_fleet_support: Any = importlib.import_module("tests.support.fleet")
Fleet, Node = _fleet_support.Fleet, _fleet_support.Node

TARGET = 2.0  # seconds from a committed renewal to every node serving it (the issue's, on loopback)
PROBE_EVERY = 0.01  # seconds between handshake rounds


class Prober:
    """Handshakes with every node in a loop; ``first[node][fingerprint]``: when it was first served."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.first: dict[str, dict[str, float]] = {n.name: {} for n in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-prober", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                try:
                    fp = node.served()
                except Exception:  # noqa: BLE001 - a handshake refused during a reload: try again
                    continue
                self.first[node.name].setdefault(fp, time.time())
            self._stop.wait(PROBE_EVERY)


def nginx_in(base: Path, wave: int = 0) -> Any:
    """An nginx_factory (tests.support.server_fixtures) outside pytest: servers listed for stopping.
    With ``wave``, each also serves the wave certificates from ``<cert dir>/wave/<name>/``
    (the placeholder until they are issued)."""
    servers: list[Any] = []

    def start(cert_path: Path, key_path: Path, *, server_name: str = "_") -> Any:
        workdir = Path(tempfile.mkdtemp(prefix="nginx-", dir=base))
        live = Path(cert_path).parent / "wave"
        for name in wave_names(wave):
            (live / name).mkdir(parents=True, mode=0o700)
            (live / name / "fullchain.pem").write_bytes(Path(cert_path).read_bytes())
            fd = os.open(live / name / "privkey.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, Path(key_path).read_bytes())
            os.close(fd)
        server = _start_with_retries(lambda p: NginxServer(
            workdir, p, Path(cert_path), Path(key_path), server_name=server_name, extra="",
            extra_http=nginx_server_blocks(["www", *wave_names(wave)], p, live)), None)
        servers.append(server)
        return server

    start.servers = servers  # type: ignore[attr-defined]
    return start


def stop_all(things: list[Any], method: str) -> None:
    for thing in things:
        getattr(thing, method)()


def build(base: Path, stack: list[Any], rollout: str | None = None, wave: int = 0) -> Any:
    """The three nodes (daemons started, version 1 served everywhere); ``stack``: what to stop.
    ``rollout``: the body of a ``[certificate.rollout]`` table every node gets; ``wave``: how
    many ``wave<i>`` certificates each node adds (:func:`wave_tables`)."""
    cluster = start_cluster()
    stack.append(cluster.destroy)
    peb = PebbleEnv(base / "pebble")
    stack.append(peb.stop)
    peb.start()
    ca = HostileCA(peb, base).start()
    stack.append(ca.stop)
    roots = base / "roots.pem"
    add_root(roots, peb)
    kek = base / "kek"
    fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    nginx = nginx_in(base, wave)
    stack.append(lambda: stop_all(nginx.servers, "stop"))
    test_ca = TestCA(base / "ca", "certd bench")
    dsn = cluster.database()
    nodes = [Node(f"node{i}", base, peb, ca.directory_url, dsn, kek, roots, nginx, test_ca) for i in (1, 2, 3)]
    stack.append(lambda: stop_all([node.env for node in nodes], "close"))
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
        ports -= {peb.http_port, peb.tls_port}
    for node, port in zip(nodes, sorted(ports)):
        node.configure(port)
        if rollout is not None:  # the config's one [[certificate]] is its last table
            with node.env.config_path.open("a") as f:
                f.write(f"[certificate.rollout]\n{rollout}\n")
                f.write(wave_tables(wave, node, rollout, roots))
    proxy = RoundRobinProxy(("127.0.0.1", peb.http_port), [("127.0.0.1", n.http_port) for n in nodes]).start()
    stack.append(proxy.stop)
    fleet = Fleet(nodes, ca, proxy)
    stack.append(fleet.store.close)
    for node in nodes:
        node.env.start_daemon()
    wait_until(lambda: fleet.converged(1), timeout=90, interval=0.5, what="every node serving version 1")
    wait_until(lambda: all(fleet.store.desired(n) == 1 and all(fleet.store.applied(node.name, n) == 1 for node in nodes)
                           for n in wave_names(wave)),
               timeout=60 + 3 * wave, interval=0.5, what=f"the {wave} wave certificates applied everywhere")
    return fleet


def wave_names(wave: int) -> list[str]:
    return [f"wave{i}" for i in range(1, wave + 1)]


def wave_tables(wave: int, node: Any, rollout: str, roots: Path) -> str:
    """TOML for ``wave`` certificates on ``node``, as the fleet soak's: http-01 on its responder,
    deployed to the files its nginx serves (:func:`nginx_in`), nginx reloaded, verified by
    handshake, released with ``rollout``."""
    out = []
    for name in wave_names(wave):
        files, domain = node.fullchain.parent / "wave" / name, DOMAIN.format(name=name)
        out += ["[[certificate]]", f'name = "{name}"', f'domains = ["{domain}"]', 'challenge = "http-01"',
                f'http01_listen = "127.0.0.1:{node.http_port}"', 'verify_timeout = "5s"', "[certificate.deploy]",
                "[[certificate.deploy.files]]", f'path = "{files / "fullchain.pem"}"', 'content = "fullchain"',
                "[[certificate.deploy.files]]", f'path = "{files / "privkey.pem"}"', 'content = "privkey"',
                "[[certificate.reload]]", 'hook = "nginx"', f'config = "{node.server.config}"',
                "[[certificate.verify]]", f'endpoint = "127.0.0.1:{node.server.port}"', f'sni = "{domain}"',
                f'ca_bundle = "{roots}"', "[certificate.rollout]", rollout, ""]
    return "\n".join(out)


def measure_wave(fleet: Any, wave: int) -> dict[str, list[float]]:
    """Force-renew every wave certificate at once (one ``certd renew`` on node1) and return each
    release's steps in seconds, once all are done."""
    names = wave_names(wave)
    started = time.time()
    fleet.nodes[0].env.run("renew", *names, "--force", "--wait", "--ignore-duplicate-limit", "--reason",
                           "fleet bench wave", check=0, timeout=600)
    times: dict[str, dict[str, float]] = {}

    def all_done() -> bool:
        times.update({n: t for n in names if n not in times
                      and (t := release_times(fleet, 2, n, since=started)) is not None})
        return len(times) == len(names)
    wait_until(all_done, timeout=300, interval=1.0, what=f"the {wave} releases done")
    steps: dict[str, list[float]] = {}
    for (key, a, b) in (("opened -> promoted", "opened", "promoted"), ("promoted -> done", "promoted", "done"),
                        ("opened -> done", "opened", "done")):
        steps[key] = [t[b] - t[a] for t in times.values()]
    opened = sorted(t["opened"] for t in times.values())
    print(f"  {wave} releases opened within {opened[-1] - opened[0]:.1f} s of each other", flush=True)
    return steps


def measure(fleet: Any, renewals: int, released: bool) -> tuple[list[float], list[int], dict[str, list[float]]]:
    """Seconds from commit (a release: its opening) to every node serving it, orders per
    renewal, and with ``released`` each release's steps in seconds (see the module's docstring)."""
    prober = Prober(fleet.nodes).start()
    took, orders = [], []
    steps: dict[str, list[float]] = {"opened -> promoted": [], "promoted -> done": [], "opened -> done": []}
    try:
        for i in range(renewals):
            version = 2 + i
            before = len(fleet.ca.orders_created)
            fleet.nodes[i % 3].env.run("renew", "www", "--force", "--wait", "--ignore-duplicate-limit",
                                       "--reason", "fleet bench", check=0)
            wait_until(lambda v=version: fleet.converged(v), timeout=60, interval=0.05,  # type: ignore[misc]
                       what=f"every node serving version {version}")
            want = fleet.fingerprint(version)
            wait_until(lambda w=want: all(w in prober.first[n.name] for n in fleet.nodes),  # type: ignore[misc]
                       timeout=10,
                       what="the prober seeing the new certificate on every node")
            orders.append(len(fleet.ca.orders_created) - before)
            line = ""
            if released:
                at = wait_until(lambda v=version: release_times(fleet, v), timeout=30,  # type: ignore[misc]
                                what=f"the release of version {version} done")
                assert at is not None
                start = at["opened"]
                for key, (a, b) in {"opened -> promoted": ("opened", "promoted"),
                                    "promoted -> done": ("promoted", "done"),
                                    "opened -> done": ("opened", "done")}.items():
                    steps[key].append(at[b] - at[a])
                line = "; " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in steps.items())
            else:
                start = fleet.committed_at(version)
            took.append(max(0.0, max(prober.first[n.name][want] for n in fleet.nodes) - start))
            print(f"  renewal {i + 1:>2} (version {version}, from {fleet.nodes[i % 3].name}): "
                  f"every node serving it {took[-1]:.3f} s after the {'opening' if released else 'commit'}, "
                  f"orders {orders[-1]}{line}", flush=True)
    finally:
        prober.stop()
    return took, orders, steps


def release_times(fleet: Any, version: int, name: str = "www", since: float = 0.0) -> dict[str, float] | None:
    """Unix times of the release of ``version`` of ``name``: opened, promoted, done (audit
    records after ``since``); None until it is done."""
    at: dict[str, float] = {}
    for r in fleet.store.audit.records:
        if r["version"] != version or r.get("name", name) != name:
            continue
        when = datetime.fromisoformat(str(r["time"]).replace("Z", "+00:00")).timestamp()
        if when < since:
            continue
        if r["event"] == "release_opened":
            at["opened"] = when
        elif r["event"] == "release_step" and r["detail"].get("state") in ("promoted", "done"):
            at[r["detail"]["state"]] = when
    return at if {"opened", "promoted", "done"} <= set(at) else None


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--renewals", type=int, default=10)
    ap.add_argument("--rollout", metavar="TOML",
                    help="a [certificate.rollout] body for every node, e.g. 'canaries = 1': every renewal a release")
    ap.add_argument("--wave", type=int, default=0, metavar="N",
                    help="with --rollout: N more certificates per node, force-renewed at once (N releases together)")
    args = ap.parse_args()
    if args.wave and not args.rollout:
        ap.error("--wave needs --rollout")
    stack: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="certd-fleet-bench-") as tmp:
        try:
            fleet = build(Path(tmp), stack, args.rollout, args.wave)
            if args.wave:
                print(f"fleet bench: 3 certd nodes, one PostgreSQL, Pebble; a wave of {args.wave} releases "
                      f"([certificate.rollout] {args.rollout})", flush=True)
                wave_steps = measure_wave(fleet, args.wave)
                for key, values in wave_steps.items():
                    print(f"wave release {key}: p50 {statistics.median(values):.3f} s, p95 {pct(values, 95):.3f} s, "
                          f"max {max(values):.3f} s")
            print(f"fleet bench: 3 certd nodes (nginx each), one PostgreSQL, Pebble; {args.renewals} forced renewals"
                  + (f", each a release ([certificate.rollout] {args.rollout})" if args.rollout else ""))
            took, orders, steps = measure(fleet, args.renewals, args.rollout is not None)
        except Exception:
            for log in sorted(Path(tmp).glob("node*/daemon.log")):  # what the nodes said, before it is removed
                print(f"--- {log.parent.name}: the end of its daemon log", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-25:]), file=sys.stderr)
            raise
        finally:
            for stop in reversed(stack):
                try:
                    stop()
                except Exception as e:  # noqa: BLE001 - tear down the rest regardless
                    print(f"fleet bench: teardown: {e}", file=sys.stderr)
    p50, p95 = statistics.median(took), pct(took, 95)
    conv_ok, orders_ok = p95 <= TARGET, all(n == 1 for n in orders)
    since = "release opened" if args.rollout else "commit"
    print(f"{since} -> every node serving it (handshake): p50 {p50:.3f} s, p95 {p95:.3f} s, max {max(took):.3f} s "
          f"(target <= {TARGET:g} s): {'ok' if conv_ok else 'MISSED'}")
    print(f"orders per renewal: {', '.join(map(str, orders))} (must be exactly 1): {'ok' if orders_ok else 'MISSED'}")
    for key, values in steps.items():
        if values:
            print(f"release {key}: p50 {statistics.median(values):.3f} s, p95 {pct(values, 95):.3f} s, "
                  f"max {max(values):.3f} s")
    return 0 if conv_ok and orders_ok else 1


if __name__ == "__main__":
    sys.exit(main())
