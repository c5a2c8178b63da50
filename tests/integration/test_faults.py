"""The fault-injection matrix: whatever fails around certd, a served certificate is never broken,
never expired and never lost, and certd recovers by itself once the fault clears.

Each test runs real Pebble, nginx and certd processes, injects one fault, and checks the same
invariants (:meth:`FaultSite.assert_invariants`): a prober handshaking nginx all along never saw
an expired, untrusted, misnamed or mismatched certificate (only "unreachable" or "dropped"
while a test itself takes nginx down), the certificate and key on disk belong together, and the key of the
served certificate is in the store.

Faults covered elsewhere, not repeated here: CA down and back (test_rotation
``test_ca_down_...``, test_daemon ``test_ca_down_backs_off_...``), reload hook exiting 1 or
hanging (test_rotation), certd SIGKILLed at every journal step and during a rollback
(test_rotation), SIGTERM mid-rotation (test_daemon), hostile CA answers (test_hostile_ca).
"""

from __future__ import annotations

import os
from datetime import datetime
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cryptography.hazmat.primitives import hashes

from certd.crypto.keys import load_private_key
from certd.core.model import spki_sha256
from certd.store.files import FileStore
from tests.support.certd_env import CertdEnv, key_matches
from tests.support.delay_proxy import DelayProxy
from tests.support.hostile_ca import HostileCA
from tests.support.procs import wait_until
from tests.support.prober import Prober, Target, TrustAnchors, probe_once, verified_leaf
from tests.support.tmpfs import fill, remount_ro, remount_rw, small_tmpfs

SNI = "www.example.test"
DOMAINS = [SNI, "example.test"]


class FaultSite:
    """certd managing 'www' for one nginx (reload hook, handshake verify), watched by a prober."""

    def __init__(self, env: CertdEnv, nginx: Any, live: Path, base: dict[str, Any]) -> None:
        self.env, self.nginx, self.live, self.base = env, nginx, live, base
        self.roots = env.dir / "roots.pem"       # every Pebble root seen (Pebble restarts make new ones)
        self.anchors = TrustAnchors(self.roots)
        self.prober = Prober([Target("127.0.0.1", nginx.port, SNI)], self.anchors)

    def cert(self, **kw: Any) -> dict[str, Any]:
        return {**self.base, "reload": [{"hook": "nginx", "config": str(self.nginx.config)}],
                "verify": [{"endpoint": f"127.0.0.1:{self.nginx.port}", "sni": SNI, "ca_bundle": str(self.roots)}],
                "verify_timeout": "2s", **kw}

    def configure(self, **kw: Any) -> None:
        self.env.write_config([self.cert(**kw)])

    def stored(self) -> dict[str, Any]:
        return self.env.status("www")["www"]

    def served(self) -> Any:
        return verified_leaf(Target("127.0.0.1", self.nginx.port, SNI), self.anchors)

    def versions(self) -> list[int]:
        return FileStore(self.env.state_dir).versions("www")

    def assert_invariants(self) -> None:
        """No bad certificate was ever seen; disk and store are consistent with what is served."""
        assert self.prober.total > 0
        assert self.prober.unexpected() == [], [(r.category, r.detail, r.at, r.info and r.info.serial)
                                                for r in self.prober.unexpected()]
        assert key_matches(self.live / "fullchain.pem", self.live / "privkey.pem")
        served = self.served()
        keys = {spki_sha256(load_private_key(p.read_bytes()).public_key())
                for p in (self.env.state_dir / "certs" / "www" / "versions").glob("*/privkey.pem")}
        assert served.spki_sha256 in keys, "the served certificate's key is not in the store"


def add_root(roots: Path, pebble: Any) -> None:
    """Append Pebble's current root to the trust-anchor file (old certificates stay trusted)."""
    old = roots.read_text() if roots.exists() else ""
    new = pebble.root_pem()
    if new not in old:
        tmp = roots.with_suffix(".tmp")
        tmp.write_text(old + new)
        os.replace(tmp, roots)


def make_site(tmp_path: Path, pebble: Any, nginx_factory: Any, *, state_dir: Path | None = None,
              live: Path | None = None, directory: str | None = None, **cert_extra: Any) -> FaultSite:
    """Issue a first certificate with the CLI, start nginx on it, configure reload + verify.
    ``directory``: talk to the CA there (a tests.support.hostile_ca proxy) instead of Pebble."""
    env = CertdEnv(tmp_path, pebble)
    if directory is not None:
        env.acme_extra["directory"] = directory
    if state_dir is not None:
        env.state_dir = state_dir
    live = live or tmp_path / "live" / "www"
    challenge = cert_extra.pop("challenge", "http-01")
    make = env.dns_cert if challenge == "dns-01" else env.http_cert
    base = make("www", DOMAINS, deploy={"live_dir": str(live)}, **cert_extra)
    env.write_config([base])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem", server_name=SNI)
    site = FaultSite(env, nginx, live, base)
    add_root(site.roots, pebble)
    site.configure()
    return site


@pytest.fixture
def sites(tmp_path: Path, nginx_factory: Any) -> Iterator[list[FaultSite]]:
    """Sites made by a test (``sites.append(make_site(...))``); probers and daemons are stopped after."""
    made: list[FaultSite] = []
    yield made
    for site in made:
        site.prober.stop()
        site.env.close()


def start(sites: list[FaultSite], site: FaultSite) -> FaultSite:
    sites.append(site)
    site.prober.start()
    wait_until(lambda: site.prober.total >= 1, timeout=10, what="a first probe")
    return site


def renew_forced(site: FaultSite, check: int, timeout: float = 60) -> Any:
    started = time.monotonic()
    r = site.env.run("renew", "www", "--force", check=check, timeout=timeout)
    assert "Traceback" not in r.stdout + r.stderr
    return r, time.monotonic() - started


# --- the CA ----------------------------------------------------------------------------------


def test_ca_killed_mid_order_fails_cleanly_and_the_next_renewal_works(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """Pebble SIGKILLed mid-order (from the dns-01 hook): one line, nothing stored; the restarted CA renews."""
    peb = pebble_factory()
    site = start(sites, make_site(tmp_path, peb, nginx_factory, challenge="dns-01"))
    before = site.served()
    killer = tmp_path / "kill-ca-hook"
    killer.write_text('#!/bin/sh\n[ "$2" = set ] && kill -9 "$1"\nexit 0\n')
    killer.chmod(0o755)
    site.configure(dns01_hook=[str(killer), str(peb.pebble_pid)])
    r, _ = renew_forced(site, check=1)
    assert "not reachable" in r.stdout and len(r.stdout.strip().splitlines()) == 1, r.stdout
    assert site.versions() == [1] and site.stored()["rotation"] is None
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    peb.start()                       # fresh Pebble: no account, a new root
    add_root(site.roots, peb)
    site.configure()
    renew_forced(site, check=0)
    row = site.stored()
    assert row["version"] == 2 and row["last_result"] == "success"
    assert site.served().fingerprint_sha256 == row["fingerprint_sha256"]
    site.assert_invariants()


def test_half_of_all_nonces_rejected_during_rotations_with_nginx(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """With PEBBLE_WFE_NONCEREJECT=50 every request may get badNonce: three full rotations still succeed."""
    peb = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "50"})
    site = start(sites, make_site(tmp_path, peb, nginx_factory))
    retries = 0
    for version in (2, 3, 4):
        r = site.env.run("--debug", "renew", "www", "--force", check=0)
        retries += r.stderr.count("badNonce (attempt")
        row = site.stored()
        assert row["version"] == version and row["last_result"] == "success"
        assert site.served().fingerprint_sha256 == row["fingerprint_sha256"]
    assert retries >= 3, "Pebble rejected fewer nonces than expected: is PEBBLE_WFE_NONCEREJECT honoured?"
    site.assert_invariants()


@pytest.fixture
def slow_ca(pebble: Any) -> Iterator[DelayProxy]:
    """A DelayProxy in front of the shared Pebble's ACME port (starts fast)."""
    with DelayProxy(pebble.ports.acme) as proxy:
        yield proxy


def test_slow_ca_within_the_deadline_still_renews(
        tmp_path: Path, pebble: Any, nginx_factory: Any, slow_ca: DelayProxy, sites: list[FaultSite]) -> None:
    """Every CA answer 150 ms late: renewal takes longer and succeeds."""
    site = start(sites, make_site(tmp_path, pebble, nginx_factory))
    site.env.acme_extra["directory"] = f"https://127.0.0.1:{slow_ca.port}/dir"
    site.configure()
    slow_ca.delay = 0.15
    renew_forced(site, check=0)
    assert site.stored()["version"] == 2
    site.assert_invariants()


@pytest.mark.parametrize("how", ["delay", "trickle"])
def test_ca_slower_than_the_order_deadline_fails_in_time(
        tmp_path: Path, pebble: Any, nginx_factory: Any, slow_ca: DelayProxy, sites: list[FaultSite],
        how: str) -> None:
    """A CA answering after the order deadline, or a byte at a time, fails at the deadline; nginx keeps its cert."""
    site = start(sites, make_site(tmp_path, pebble, nginx_factory))
    before = site.served()
    site.env.acme_extra.update(directory=f"https://127.0.0.1:{slow_ca.port}/dir", order_timeout="3s")
    site.configure()
    if how == "delay":
        slow_ca.delay = 6.0
    else:
        slow_ca.trickle = 0.2        # ~5 bytes/s: each read returns quickly, the answer never ends
    r, took = renew_forced(site, check=1)
    assert took < 15, f"renew took {took:.1f}s with a 3 s order deadline"
    (line,) = r.stdout.strip().splitlines()
    assert "3 s order deadline" in line and "answers too slowly" in line, line
    assert site.versions() == [1]
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    slow_ca.delay = slow_ca.trickle = 0.0
    renew_forced(site, check=0)
    assert site.stored()["version"] == 2
    site.assert_invariants()


# --- the server ------------------------------------------------------------------------------


def kill_nginx(nginx: Any) -> None:
    """SIGKILL nginx's master and workers by PID, as a crash would, and reap the master."""
    pids = [nginx.pid, *nginx.worker_pids()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not nginx.alive, timeout=5, what="nginx gone")


def test_nginx_crashed_before_the_reload_fails_the_rotation_without_hanging(
        tmp_path: Path, pebble: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """nginx SIGKILLed before its reload and left down: switched back, reported at once; later rotations work."""
    site = start(sites, make_site(tmp_path, pebble, nginx_factory))
    before = site.served()
    site.prober.allow = {"unreachable", "dropped"}
    pids_file = tmp_path / "nginx-pids"
    killer = tmp_path / "kill-nginx-hook"
    killer.write_text(f'#!/bin/sh\nkill -9 $(cat {pids_file})\nexit 0\n')
    killer.chmod(0o755)
    pids_file.write_text(" ".join(map(str, [site.nginx.pid, *site.nginx.worker_pids()])))
    # nginx's workers run as another user: killing them takes CAP_KILL, which a command hook
    # keeps only when its entry names it (certd/core/capabilities.py)
    site.configure(reload=[{"command": [str(killer)], "capabilities": ["CAP_KILL"]}, {"hook": "nginx", "config": str(site.nginx.config)}])
    r, took = renew_forced(site, check=1)
    assert took < 30
    assert "ROLLBACK FAILED" in r.stdout and "connection refused" in r.stdout, r.stdout
    wait_until(lambda: not site.nginx.alive, timeout=5, what="nginx gone")
    row = site.stored()
    assert row["version"] == 1 and row["rotation"] is None
    assert os.readlink(site.live).endswith("0001")           # switched back on disk
    assert key_matches(site.live / "fullchain.pem", site.live / "privkey.pem")
    site.nginx.start()                                         # the operator (or systemd) starts nginx
    site.prober.allow = set()
    prober_mark = site.prober.total
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    site.configure()
    renew_forced(site, check=0)
    row = site.stored()
    assert row["version"] == 3 and site.served().fingerprint_sha256 == row["fingerprint_sha256"]
    wait_until(lambda: site.prober.total > prober_mark + 3, timeout=10, what="probes after the restart")
    site.assert_invariants()


def test_nginx_crashing_and_restarted_by_its_supervisor_mid_rotation(
        tmp_path: Path, pebble: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """nginx SIGKILLed mid-rotation and restarted at once: the rotation ends either way, serving the store's current."""
    site = start(sites, make_site(tmp_path, pebble, nginx_factory))
    site.prober.allow = {"unreachable", "dropped"}
    stop = threading.Event()

    failed_starts: list[str] = []

    def supervise() -> None:
        """Restart nginx whenever it is down, like systemd's Restart=always. A start that reads
        the live directory's fullchain.pem before a switch and its privkey.pem after it fails
        ("key values mismatch"; only one combined file avoids that, see docs/ROTATION.md) and is
        simply tried again, as systemd would."""
        while not stop.is_set():
            if not site.nginx.alive:
                try:
                    site.nginx.start()
                except RuntimeError as e:
                    failed_starts.append(str(e))
            stop.wait(0.01)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        for _ in range(3):
            pids_file = tmp_path / "nginx-pids"
            pids_file.write_text(" ".join(map(str, [site.nginx.pid, *site.nginx.worker_pids()])))
            killer = tmp_path / "kill-nginx-hook"
            killer.write_text(f'#!/bin/sh\nkill -9 $(cat {pids_file})\nexit 0\n')
            killer.chmod(0o755)
            site.configure(reload=[{"command": [str(killer)], "capabilities": ["CAP_KILL"]}, {"hook": "nginx", "config": str(site.nginx.config)}])
            r, took = renew_forced(site, check=None)  # type: ignore[arg-type]
            assert took < 30 and r.returncode in (0, 1), r.stdout
            assert "renewed" in r.stdout or "rolled back to version" in r.stdout, r.stdout
            wait_until(lambda: site.nginx.alive and site.nginx.pid_file.exists(), timeout=10,
                       what=f"nginx back (failed starts: {failed_starts})")
            wait_until(lambda: probe_once(Target("127.0.0.1", site.nginx.port, SNI), site.anchors).ok,
                       timeout=10, what="nginx serving again")
            assert site.served().fingerprint_sha256 == site.stored()["fingerprint_sha256"]
        site.prober.allow = set()
        site.configure()
        renew_forced(site, check=0)
        assert site.served().fingerprint_sha256 == site.stored()["fingerprint_sha256"]
        site.assert_invariants()
    finally:
        # nginx was (re)started from the supervisor thread: it gets SIGTERM when that thread
        # ends (PR_SET_PDEATHSIG follows the thread), so the thread lives to the very end.
        stop.set()
        supervisor.join(timeout=10)


# --- the disk --------------------------------------------------------------------------------


def test_full_state_disk_fails_issuance_cleanly_and_the_next_renewal_works(
        tmp_path: Path, pebble: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """A full state disk fails the renewal with one line naming the path, nothing half-written; freed, it renews.

    It fails before ordering: the certificate's lease (its fencing token must be durable) is the
    first write, so a disk that cannot keep a new version costs the CA no order."""
    with small_tmpfs(tmp_path / "statefs", size="1m") as mnt:
        site = start(sites, make_site(tmp_path, pebble, nginx_factory, state_dir=mnt / "state"))
        before = site.served()
        fill(mnt)
        r, _ = renew_forced(site, check=1)
        (line,) = r.stdout.strip().splitlines()
        assert f"cannot write {mnt}/state/certs/www/lease.json" in line, line
        assert "No space left on device (the filesystem is full; free some space)" in line, line
        versions_dir = mnt / "state" / "certs" / "www" / "versions"
        assert sorted(p.name for p in versions_dir.iterdir()) == ["0001"]
        assert site.served().fingerprint_sha256 == before.fingerprint_sha256
        (mnt / ".filler").unlink()
        renew_forced(site, check=0)
        row = site.stored()
        assert row["version"] == 2 and site.served().fingerprint_sha256 == row["fingerprint_sha256"]
        site.assert_invariants()
        site.prober.stop()


def test_full_state_disk_under_the_daemon_recovers_without_help(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """certd run on a full state disk backs off, orders nothing, keeps the served certificate, and renews once space is free.

    The failures cannot be saved, yet each waits out the backoff (3.6 s, 7.2 s ... for a one-hour
    certificate): the daemon keeps it in memory. Before, every lost write meant "due now" again:
    an attempt every round (11,792 in 40 s on the code before issue 11). The lease is written
    before the order, so the CA sees no order while the disk is full."""
    peb = pebble_factory(validity=3600)
    ca = HostileCA(peb, tmp_path).start()       # counts the orders
    ca.hide_ari = True                          # Pebble 2.10's ARI window would beat renew_before
    with small_tmpfs(tmp_path / "statefs", size="2m") as mnt:
        try:
            site = start(sites, make_site(tmp_path, peb, nginx_factory, state_dir=mnt / "state",
                                          directory=ca.directory_url))
            _full_disk_backs_off_then_renews(site, ca, mnt)
        finally:
            ca.stop()


def _full_disk_backs_off_then_renews(site: FaultSite, ca: HostileCA, mnt: Path) -> None:
    before = site.served()
    fill(mnt)
    site.configure(renew_before="59m58s")        # due one second after issuance, always
    first = len(ca.orders_created)
    daemon = site.env.start_daemon()
    wait_until(lambda: len(_failed_at(daemon.log_text())) >= 3, timeout=40, what="three attempts failing on the full disk")
    attempts = _failed_at(daemon.log_text())[:3]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # 3.6 s, then 7.2 s (+ up to 10 % jitter): the backoff grows. The failure time is stored to
    # the second, so a retry may come up to 1 s early: bounds with that slack (a tight loop: 0.02 s)
    assert gaps[0] >= 2.5 and gaps[1] >= 1.5 * gaps[0], gaps
    assert "No space left on device" in daemon.log_text()
    assert len(ca.orders_created) == first                     # nothing ordered that could not be kept
    assert site.versions() == [1]
    assert site.served().fingerprint_sha256 == before.fingerprint_sha256
    (mnt / ".filler").unlink()
    wait_until(lambda: (site.versions() or [0])[-1] >= 2 and site.stored()["last_result"] == "success",
               timeout=60, what="a renewal once space is free")
    daemon.stop(timeout=30)
    assert daemon.returncode == 0
    assert site.served().fingerprint_sha256 == site.stored()["fingerprint_sha256"]
    site.assert_invariants()
    site.prober.stop()


def _failed_at(log_text: str) -> list[float]:
    """When each failed attempt of www was recorded (seconds, from the log's timestamps): the
    ``renewal_failed name=www failures=N`` lines, the first for each N (a line without
    ``failures=`` is not an attempt the backoff counts)."""
    found: dict[str, float] = {}
    for line in log_text.splitlines():
        if " renewal_failed name=www failures=" in line:
            n = line.split(" failures=", 1)[1].split(" ", 1)[0]
            found.setdefault(n, datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return sorted(found.values())


def test_read_only_deploy_directory_fails_before_the_switch_and_recovers(
        tmp_path: Path, pebble: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """A read-only deploy directory fails the rotation before the switch with one line; writable again, it renews."""
    with small_tmpfs(tmp_path / "deployfs", size="1m") as mnt:
        site = start(sites, make_site(tmp_path, pebble, nginx_factory, live=mnt / "www"))
        before = site.served()
        remount_ro(mnt)
        r, _ = renew_forced(site, check=1)
        (line,) = r.stdout.strip().splitlines()
        assert str(mnt) in line and "read-only" in line, line
        row = site.stored()
        assert row["version"] == 1 and row["rotation"] is None
        assert os.readlink(site.live).endswith("0001")
        assert site.served().fingerprint_sha256 == before.fingerprint_sha256
        remount_rw(mnt)
        renew_forced(site, check=0)
        row = site.stored()
        assert row["version"] == 3 and site.served().fingerprint_sha256 == row["fingerprint_sha256"]
        site.assert_invariants()
        site.prober.stop()


# --- time ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_certificate_expired_while_certd_was_stopped_is_renewed_at_start(
        tmp_path: Path, pebble_factory: Any, nginx_factory: Any, sites: list[FaultSite]) -> None:
    """A 15-second certificate expires while no certd runs: the daemon renews it as soon as it starts."""
    peb = pebble_factory(validity=15)
    site = start(sites, make_site(tmp_path, peb, nginx_factory))
    site.prober.allow = {"expired"}
    wait_until(lambda: site.prober.last[site.prober.targets[0]].category == "expired", timeout=30,
               what="the served certificate to expire")
    started = time.monotonic()
    daemon = site.env.start_daemon()
    # Committed means verified: nginx's old workers (which may still hand out the expired
    # certificate for ~100 ms after the reload) have stopped accepting by then.
    wait_until(lambda: (row := site.stored())["last_result"] == "success" and row["version"] >= 2, timeout=15,
               what="the daemon's first rotation committed")
    assert time.monotonic() - started < 15
    site.prober.allow = set()
    assert probe_once(Target("127.0.0.1", site.nginx.port, SNI), site.anchors).ok
    mark = site.prober.total
    wait_until(lambda: site.prober.total > mark + 20, timeout=10, what="more probes")
    daemon.stop(timeout=30)
    site.assert_invariants()


# --- many certificates, one nginx, one HAProxy ------------------------------------------------


@pytest.mark.slow
def test_many_certificates_rotating_at_once_on_one_nginx_and_one_haproxy(
        tmp_path: Path, pebble: Any, certd_env: Any) -> None:
    """Ten certificates on one nginx and one HAProxy, force-renewed together thrice: all commit, each name its own cert."""
    from tests.support.server_fixtures import HaproxyServer, NginxServer
    from tests.support.procs import free_port

    # Two faults this caught: HAProxy 2.6 puts a `set ssl cert` payload into whatever transaction is
    # open, so two hot swaps at once served one name's certificate under the other; and nginx, which
    # opens a certificate and its key one after the other, paired the halves of another switch.
    names = [f"c{i}" for i in range(10)]
    domain = "{}.example.test".format
    env = certd_env(pebble)
    env.refresh_root()
    env.daemon_extra["workers"] = 10
    live, crt_dir = tmp_path / "live", tmp_path / "crt"
    crt_dir.mkdir()

    def cert(name: str, servers: tuple[Any, Any] | None = None) -> dict[str, Any]:
        c = env.http_cert(name, [domain(name)], deploy={"live_dir": str(live / name), "combined": str(crt_dir / f"{name}.pem")})
        if servers:
            ngx, hap = servers
            c["reload"] = [{"hook": "nginx", "config": str(ngx.config)},
                           {"hook": "haproxy", "socket": str(hap.socket), "crt": str(crt_dir / f"{name}.pem")}]
            c["verify"] = [{"endpoint": f"127.0.0.1:{ngx.port}", "ca_bundle": str(env.root_path)},
                           {"endpoint": f"127.0.0.1:{hap.port}", "ca_bundle": str(env.root_path)}]
            c["verify_timeout"] = "10s"
        return c

    env.write_config([cert(n) for n in names])
    env.run("renew", "--all", check=0)
    port = free_port()
    blocks = "\n".join(f"    server {{ listen 127.0.0.1:{port} ssl; server_name {domain(n)}; "
                       f"ssl_certificate {live / n / 'fullchain.pem'}; ssl_certificate_key {live / n / 'privkey.pem'}; "
                       f"location / {{ return 200; }} }}" for n in names[1:])
    (tmp_path / "nginx").mkdir()
    (tmp_path / "haproxy").mkdir()
    nginx = NginxServer(tmp_path / "nginx", port, live / names[0] / "fullchain.pem", live / names[0] / "privkey.pem",
                        server_name=domain(names[0]), extra="", extra_http=blocks).start()
    haproxy = HaproxyServer(tmp_path / "haproxy", free_port(), crt_dir, extra_bind="").start()
    prober = Prober([Target("127.0.0.1", s.port, domain(n)) for n in names for s in (nginx, haproxy)],
                    TrustAnchors(env.root_path), interval=0.005)
    try:
        env.write_config([cert(n, (nginx, haproxy)) for n in names])
        prober.start()
        daemon = env.start_daemon()
        for round_ in range(2, 5):
            r = env.run("renew", "--all", "--force", "--wait", check=0, timeout=180)
            assert r.stdout.count("renewed: version") == len(names), r.stdout
            rows = env.status()
            assert {row["version"] for row in rows.values()} == {round_}
            for n in names:
                for server in (nginx, haproxy):
                    info = probe_once(Target("127.0.0.1", server.port, domain(n)), prober.anchors).info
                    assert info is not None and info.fingerprint_sha256 == rows[n]["fingerprint_sha256"], (n, server.port)
        assert "rolling_back" not in daemon.log_text()
        daemon.stop(timeout=60)
        assert prober.unexpected() == [], [(str(r.target), r.category, r.detail) for r in prober.unexpected()]
        assert prober.total > 100
    finally:
        prober.stop()
        haproxy.stop()
        nginx.stop()


def test_haproxy_transaction_left_open_by_a_dead_client_is_cleared(tmp_path: Path, test_ca: Any) -> None:
    """An HAProxy transaction left open by a dead client is aborted after 2 s and the hot swap goes through."""
    from certd.config import ReloadHook
    from certd.reload.hooks import HookContext, run_reload
    from tests.support.procs import free_port
    from tests.support.server_fixtures import HaproxyServer, served_leaf

    crt_dir = tmp_path / "crt"
    crt_dir.mkdir()
    bundles = {n: test_ca.issue(f"{n}.example.test") for n in ("a", "b")}
    for n, b in bundles.items():
        (crt_dir / f"{n}.pem").write_bytes(b.combined_pem)
    (tmp_path / "haproxy").mkdir()
    haproxy = HaproxyServer(tmp_path / "haproxy", free_port(), crt_dir, extra_bind="").start()
    try:
        stray = test_ca.issue("stray.example.test").combined_pem
        reply = haproxy.command(f"set ssl cert {crt_dir / 'a.pem'} <<\n" +
                                "\n".join(line for line in stray.decode().splitlines() if line.strip()) + "\n\n")
        assert "Transaction created" in reply
        new_b = test_ca.issue("b.example.test")
        hook = ReloadHook("haproxy", timeout=10.0, socket=haproxy.socket, crt=str(crt_dir / "b.pem"))
        started = time.monotonic()
        result = run_reload(hook, HookContext("b", ("b.example.test",), 2, new_b, None, crt_dir / "b.pem"))
        assert result.ok and 1.5 < time.monotonic() - started < 8, result
        assert "Transaction aborted" in result.output
        served = {n: served_leaf(haproxy.port, f"{n}.example.test").fingerprint(hashes.SHA256()).hex()
                  for n in ("a", "b")}
        assert served == {"a": bundles["a"].info.fingerprint_sha256, "b": new_b.info.fingerprint_sha256}
    finally:
        haproxy.stop()
