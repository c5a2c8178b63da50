"""pytest fixtures: a real Pebble 2.10 ACME server and its pebble-challtestsrv, on loopback.

``pebble``
    One shared instance for the whole session: deterministic settings (no validation sleeps,
    no spurious badNonce, no authorization reuse) and real challenge validation. Tests must
    not stop it or change its behaviour; use ``pebble_factory`` for that.
``pebble_factory``
    ``pebble_factory(env={...}, validity=120, retry_after=1, config={...})`` starts a private
    instance (its own challtestsrv, ports and temp dir) that is stopped after the test.

Both give a :class:`PebbleEnv`. Pebble's state is in memory: every start has a new random
root and intermediate, so fetch them (``root_pem()``) after a (re)start, never cache them
across one. Binaries come from ``.cache/pebble/bin`` (``bash pebble/install.sh``).

How validation reaches the code under test: Pebble asks challtestsrv's DNS for every name,
which answers 127.0.0.1 for any A query (and nothing for AAAA), so an http-01 responder must
listen on ``127.0.0.1:<http_port>`` and a tls-alpn-01 responder on ``127.0.0.1:<tls_port>``;
dns-01 records are set with :meth:`PebbleEnv.set_txt`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.procs import ManagedProcess, ProcessFailed, free_port, free_tcp_udp_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PEBBLE_BIN_DIR = Path(os.environ.get("CERTD_PEBBLE_BIN_DIR", REPO_ROOT / ".cache" / "pebble" / "bin"))
CONFIG_TEMPLATE = REPO_ROOT / "pebble" / "pebble-config.json"
GEN_CERTS = REPO_ROOT / "pebble" / "gen_certs.py"

#: Settings that make Pebble deterministic; ``pebble_factory(env=...)`` overrides them.
DETERMINISTIC_ENV: dict[str, str] = {
    "PEBBLE_VA_NOSLEEP": "1",  # no random 0-15 s sleep before each validation
    "PEBBLE_WFE_NONCEREJECT": "0",  # default rejects 5 % of good nonces (badNonce)
    "PEBBLE_AUTHZREUSE": "0",  # default reuses valid authzs 50 % of the time (no validation)
}

#: Seconds to wait for a process to answer after it was started.
START_TIMEOUT = 15.0
#: Seconds for one HTTP request to Pebble or challtestsrv.
HTTP_TIMEOUT = 10.0
#: Seconds for one readiness probe: short, so a dead process is noticed promptly even when
#: something else holds its port and accepts connections without answering.
PROBE_TIMEOUT = 1.0
#: Attempts with fresh ports when a port picked by free_port() was taken in the meantime.
PORT_ATTEMPTS = 3

__all__ = ["DETERMINISTIC_ENV", "PebbleEnv", "PebblePorts", "pebble", "pebble_factory"]


def _load_gen_certs() -> ModuleType:
    """Import pebble/gen_certs.py by path (``pebble/`` is a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("certd_pebble_gen_certs", GEN_CERTS)
    assert spec is not None and spec.loader is not None, f"cannot load {GEN_CERTS}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _binary(name: str) -> Path:
    path = PEBBLE_BIN_DIR / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `bash pebble/install.sh` (or scripts/setup.sh)")
    return path


@dataclass(frozen=True)
class PebblePorts:
    """Every loopback port one Pebble environment uses."""

    acme: int  # Pebble's ACME listener (the directory)
    mgmt: int  # Pebble's management API
    http: int  # Pebble's httpPort: where it connects for http-01 validation
    tls: int  # Pebble's tlsPort: where it connects for tls-alpn-01 validation
    dns: int  # challtestsrv's DNS server (UDP and TCP), Pebble's resolver
    challtestsrv: int  # challtestsrv's management API (plain HTTP)

    @classmethod
    def pick(cls) -> PebblePorts:
        """Free loopback ports for everything (the DNS port is free for UDP and TCP)."""
        return cls(
            acme=free_port(),
            mgmt=free_port(),
            http=free_port(),
            tls=free_port(),
            dns=free_tcp_udp_port(),
            challtestsrv=free_port(),
        )


def ari_finds(cert_pem: bytes) -> bool:
    """False for a certificate Pebble 2.10's ARI endpoint answers "not found" (serverInternal).

    Pebble looks an ARI identifier's serial up by the hex of its DER bytes but stores serials
    without DER's leading zero, so a serial whose DER encoding starts with 0x00 (top bit set)
    is never found: no renewal window, and ``replaces`` naming it is refused. A test that needs
    ARI to answer for a certificate re-issues until this is true (a real CA has no such gap).
    """
    from certd.acme.issuer import ari_cert_id  # the ACME client only where a test needs it

    serial = ari_cert_id(cert_pem).split(".")[1]
    return base64.urlsafe_b64decode(serial + "=" * (-len(serial) % 4))[0] != 0


class PebbleEnv:
    """A Pebble ACME server plus its pebble-challtestsrv, on fixed loopback ports.

    ``start()``/``stop()``/``kill()`` act on both processes; after a stop or kill, ``start()``
    brings them back on the SAME ports with fresh in-memory state (new root, no accounts).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        validity: int | None = None,
        retry_after: int | Mapping[str, int] | None = None,
        config: Mapping[str, Any] | None = None,
        ports: PebblePorts | None = None,
    ) -> None:
        """Prepare (not start) an environment in ``workdir``.

        ``env`` overrides :data:`DETERMINISTIC_ENV` (e.g. ``{"PEBBLE_WFE_NONCEREJECT": "50"}``);
        ``validity`` is the ``default`` profile's ``validityPeriod`` in seconds; ``retry_after`` sets
        Pebble's ``retryAfter`` for pending authzs/orders (an int sets both, or a
        ``{"authz": n, "order": n}`` dict): 0 (the template's default) sends no
        ``Retry-After`` header, n >= 1 sends an HTTP-date up to n s ahead. ``config`` is
        merged into the ``"pebble"`` section last. ``ports`` defaults to fresh free ports.
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env: dict[str, str] = {**DETERMINISTIC_ENV, **(env or {})}
        self.validity = validity
        self.retry_after = retry_after
        self.extra_config: dict[str, Any] = dict(config or {})
        self._fixed_ports = ports is not None
        self.ports = ports or PebblePorts.pick()
        self.certs_dir = self.workdir / "tls"
        self.config_path = self.workdir / "pebble-config.json"
        self._pebble: ManagedProcess | None = None
        self._challtestsrv: ManagedProcess | None = None
        self._ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<PebbleEnv {self.directory_url} pid={self.pebble_pid}>"

    # -- addresses ---------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        """The ACME directory URL (HTTPS; trust :attr:`ca_bundle`)."""
        return f"https://127.0.0.1:{self.ports.acme}/dir"

    @property
    def mgmt_url(self) -> str:
        """Base URL of Pebble's management API (HTTPS, same transport CA), no trailing slash."""
        return f"https://127.0.0.1:{self.ports.mgmt}"

    @property
    def ca_bundle(self) -> Path:
        """CA that signs Pebble's own HTTPS listeners: what an ACME client passes as verify."""
        return self.certs_dir / "ca.pem"

    @property
    def http_port(self) -> int:
        """Pebble's httpPort: an http-01 responder must listen on 127.0.0.1:<this>."""
        return self.ports.http

    @property
    def tls_port(self) -> int:
        """Pebble's tlsPort: a tls-alpn-01 responder must listen on 127.0.0.1:<this>."""
        return self.ports.tls

    @property
    def dns_port(self) -> int:
        """challtestsrv's DNS port (UDP+TCP on 127.0.0.1), which Pebble resolves names with."""
        return self.ports.dns

    @property
    def challtestsrv_url(self) -> str:
        """challtestsrv's management API (plain HTTP), no trailing slash."""
        return f"http://127.0.0.1:{self.ports.challtestsrv}"

    @property
    def pebble_pid(self) -> int | None:
        """PID of the running Pebble (``None`` if not started)."""
        return self._pebble.pid if self._pebble is not None else None

    @property
    def challtestsrv_pid(self) -> int | None:
        """PID of the running pebble-challtestsrv (``None`` if not started)."""
        return self._challtestsrv.pid if self._challtestsrv is not None else None

    @property
    def alive(self) -> bool:
        """True while both processes run."""
        procs = (self._pebble, self._challtestsrv)
        return all(proc is not None and proc.alive for proc in procs)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> PebbleEnv:
        """Start challtestsrv then Pebble and wait until both answer. Returns ``self``.

        The first start retries with fresh ports if one was taken meanwhile (unless ports
        were given); later starts reuse the same ports. A process that fails to start raises
        :class:`ProcessFailed` with the tail of its log.
        """
        if self.alive:
            raise RuntimeError(f"{self!r} is already running")
        self.stop()  # whichever half may still run after a partial failure
        if not self.ca_bundle.exists():
            _load_gen_certs().write_certs(self.certs_dir)
        first_start = self._pebble is None
        attempts = PORT_ATTEMPTS if first_start and not self._fixed_ports else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except ProcessFailed as exc:
                self.stop()
                if attempt == attempts or "address already in use" not in str(exc):
                    raise
                self.ports = PebblePorts.pick()
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self._write_config()
        self._start_challtestsrv()
        self._start_pebble()

    def _start_challtestsrv(self) -> None:
        self._challtestsrv = ManagedProcess(
            [
                _binary("pebble-challtestsrv"),
                "-management", f"127.0.0.1:{self.ports.challtestsrv}",
                "-dnsserver", f"127.0.0.1:{self.ports.dns}",  # 2.10: was -dns01
                "-defaultIPv4", "127.0.0.1",
                # The default "::1" makes Pebble dial [::1] and miss a 127.0.0.1 responder.
                "-defaultIPv6", "",
                # Its own challenge responders would sit on the ports the code under test needs.
                "-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "",
            ],
            log_path=self.workdir / "challtestsrv.log",
            name="pebble-challtestsrv",
        ).start()
        self._challtestsrv.wait_ready(
            lambda: self._answers(self.challtestsrv_url + "/", ok_status=(200, 404, 405)),
            START_TIMEOUT,
            what=f"management API at {self.challtestsrv_url}",
        )
        self._challtestsrv.wait_ready(
            lambda: self.resolve_a("ready.certd.test.", timeout=PROBE_TIMEOUT) == ["127.0.0.1"],
            START_TIMEOUT,
            what=f"DNS answers on 127.0.0.1:{self.ports.dns}",
        )

    def _start_pebble(self) -> None:
        dns = f"127.0.0.1:{self.ports.dns}"
        self._pebble = ManagedProcess(
            [_binary("pebble"), "-config", self.config_path, "-dnsserver", dns],
            log_path=self.workdir / "pebble.log",
            env=self.env,
            cwd=self.workdir,
            name="pebble",
        ).start()
        # Pebble logs "Listening on" before it binds: only an answer means ready.
        self._pebble.wait_ready(
            lambda: self._answers(self.directory_url),
            START_TIMEOUT,
            what=f"directory at {self.directory_url}",
        )
        self._pebble.wait_ready(
            lambda: self._answers(self.mgmt_url + "/roots/0"),
            START_TIMEOUT,
            what=f"management API at {self.mgmt_url}",
        )

    def _answers(self, url: str, ok_status: tuple[int, ...] = (200,)) -> bool:
        """Readiness probe: True if ``url`` answers GET with one of ``ok_status``."""
        return self._http("GET", url, ok_status=ok_status, timeout=PROBE_TIMEOUT) is not None

    def stop(self) -> None:
        """SIGTERM both processes by PID (SIGKILL after a deadline) and reap them."""
        for proc in (self._pebble, self._challtestsrv):
            if proc is not None:
                proc.stop()

    def kill(self) -> None:
        """SIGKILL both processes by PID at once (a crash, as far as clients can tell)."""
        for proc in (self._pebble, self._challtestsrv):
            if proc is not None:
                proc.kill()

    def restart(self) -> PebbleEnv:
        """Stop, then start on the same ports (fresh state)."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """Pebble's log so far (all starts)."""
        return self._pebble.log_text() if self._pebble is not None else ""

    def challtestsrv_log_text(self) -> str:
        """challtestsrv's log so far (all starts)."""
        return self._challtestsrv.log_text() if self._challtestsrv is not None else ""

    def _write_config(self) -> None:
        """Write Pebble's JSON config: the repo template with this instance's ports/paths."""
        template = json.loads(CONFIG_TEMPLATE.read_text())
        section: dict[str, Any] = {k: v for k, v in template["pebble"].items() if not k.startswith("_")}
        section.update(
            listenAddress=f"127.0.0.1:{self.ports.acme}",
            managementListenAddress=f"127.0.0.1:{self.ports.mgmt}",
            certificate=str(self.certs_dir / "cert.pem"),
            privateKey=str(self.certs_dir / "key.pem"),
            httpPort=self.ports.http,
            tlsPort=self.ports.tls,
        )
        if self.validity is not None:
            # Pebble 2.10 takes lifetimes from profiles only (certificateValidityPeriod is ignored).
            profiles = {name: dict(p) for name, p in section.get("profiles", {}).items()}
            profiles.setdefault("default", {"description": "certd tests"})["validityPeriod"] = int(self.validity)
            section["profiles"] = profiles
        if self.retry_after is not None:
            if isinstance(self.retry_after, int):
                section["retryAfter"] = {"authz": self.retry_after, "order": self.retry_after}
            else:
                section["retryAfter"] = dict(self.retry_after)
        section.update(self.extra_config)
        self.config_path.write_text(json.dumps({"pebble": section}, indent=2) + "\n")

    # -- Pebble's ACME and management APIs --------------------------------------------

    def directory(self) -> dict[str, Any]:
        """The ACME directory object (GET :attr:`directory_url`)."""
        body = self._http("GET", self.directory_url)
        assert body is not None
        result: dict[str, Any] = json.loads(body)
        return result

    def root_pem(self, index: int = 0) -> str:
        """PEM of Pebble's current root (``/roots/<index>``); new after every start."""
        return self._mgmt_text(f"/roots/{index}")

    def intermediate_pem(self, index: int = 0) -> str:
        """PEM of Pebble's current intermediate (``/intermediates/<index>``)."""
        return self._mgmt_text(f"/intermediates/{index}")

    def write_root(self, path: Path | str, index: int = 0) -> Path:
        """Write :meth:`root_pem` to ``path`` (a trust anchor for verifying issued certs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.root_pem(index))
        return path

    def cert_status(self, serial_hex: str) -> dict[str, Any]:
        """``/cert-status-by-serial/<hex>``: e.g. ``{"Status": "Revoked", "Reason": 1, ...}``.

        ``serial_hex`` may have colons, upper case or leading zeros; they are normalised.
        """
        serial = format(int(serial_hex.replace(":", ""), 16), "x")
        status: dict[str, Any] = json.loads(self._mgmt_text(f"/cert-status-by-serial/{serial}"))
        return status

    def _mgmt_text(self, path: str) -> str:
        body = self._http("GET", self.mgmt_url + path)
        assert body is not None
        return body.decode()

    # -- challtestsrv ------------------------------------------------------------------

    def challtestsrv_post(self, path: str, payload: Mapping[str, Any]) -> None:
        """POST ``payload`` as JSON to challtestsrv's management API (e.g. ``/set-txt``)."""
        self._http("POST", self.challtestsrv_url + path, json.dumps(payload).encode())

    def set_txt(self, host: str, value: str) -> None:
        """Serve TXT ``value`` for ``host`` (a trailing dot is added if missing)."""
        self.challtestsrv_post("/set-txt", {"host": _fqdn(host), "value": value})

    def clear_txt(self, host: str) -> None:
        """Remove the TXT records of ``host``."""
        self.challtestsrv_post("/clear-txt", {"host": _fqdn(host)})

    def add_a(self, host: str, addresses: list[str]) -> None:
        """Answer A queries for ``host`` with ``addresses`` instead of the default 127.0.0.1."""
        self.challtestsrv_post("/add-a", {"host": _fqdn(host), "addresses": addresses})

    def resolve_a(self, name: str, timeout: float = 2.0) -> list[str]:
        """Ask challtestsrv's DNS (UDP) for A records of ``name``, as Pebble would."""
        return [socket.inet_ntoa(r) for r in dns_query(name, self.ports.dns, qtype=1, timeout=timeout)]

    def resolve_txt(self, name: str, timeout: float = 2.0) -> list[str]:
        """Ask challtestsrv's DNS (UDP) for TXT records of ``name`` (strings joined per record)."""
        records = dns_query(name, self.ports.dns, qtype=16, timeout=timeout)
        return [_txt_strings(r) for r in records]

    # -- transport ---------------------------------------------------------------------

    def _http(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        ok_status: tuple[int, ...] = (200,),
        timeout: float = HTTP_TIMEOUT,
    ) -> bytes | None:
        """One request; returns the body for a status in ``ok_status``, else raises."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=str(self.ca_bundle))
        request = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._ssl_context) as resp:
                data: bytes = resp.read()
                status: int = resp.status
        except urllib.error.HTTPError as exc:
            data, status = exc.read(), exc.code
        except urllib.error.URLError as exc:
            # Connection refused etc.: make it an OSError so wait_ready() treats it as "not yet".
            raise ConnectionError(f"{method} {url}: {exc.reason}") from exc
        if status not in ok_status:
            raise AssertionError(f"{method} {url} -> HTTP {status}: {data[:500]!r}")
        return data


def _fqdn(host: str) -> str:
    """challtestsrv matches hosts with the trailing dot: add it if missing."""
    return host if host.endswith(".") else host + "."


# -- a minimal DNS client (stdlib only), for readiness checks and tests ----------------


def dns_query(name: str, port: int, qtype: int = 1, timeout: float = 2.0, host: str = "127.0.0.1") -> list[bytes]:
    """Send one UDP DNS query for ``name``/``qtype`` to ``host:port``; return the answers' RDATA.

    Only answers whose type equals ``qtype`` are returned (CNAMEs are skipped). Raises
    ``OSError`` (e.g. ``TimeoutError``) when nothing answers.
    """
    query_id = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    question += b"\x00" + struct.pack("!HH", qtype, 1)
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        # connect(): a closed port then fails at once (ECONNREFUSED) instead of timing out.
        sock.connect((host, port))
        sock.send(packet)
        while True:
            reply = sock.recv(4096)
            if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == query_id:
                break
    _, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if flags & 0x000F:
        return []  # NXDOMAIN, SERVFAIL, ...
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(reply, offset) + 4
    answers: list[bytes] = []
    for _ in range(ancount):
        offset = _skip_name(reply, offset)
        rtype, _rclass, _ttl, rdlength = struct.unpack("!HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == qtype:
            answers.append(reply[offset : offset + rdlength])
        offset += rdlength
    return answers


def _skip_name(message: bytes, offset: int) -> int:
    """Offset just past the (possibly compressed) domain name at ``offset``."""
    while True:
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # compression pointer: two bytes, and the name ends here
            return offset + 2
        offset += 1 + length


def _txt_strings(rdata: bytes) -> str:
    """Join the character-strings of one TXT RDATA."""
    parts: list[str] = []
    offset = 0
    while offset < len(rdata):
        length = rdata[offset]
        parts.append(rdata[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return "".join(parts)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleEnv]:
    """The shared, deterministic Pebble for the session. Do not stop or reconfigure it."""
    env = PebbleEnv(tmp_path_factory.mktemp("pebble-shared"))
    try:
        env.start()
        yield env
    finally:
        env.stop()


@pytest.fixture
def pebble_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PebbleEnv]]:
    """Start private Pebble environments for one test; all are stopped (by PID) afterwards.

    ``pebble_factory(env=None, validity=None, retry_after=None, config=None) -> PebbleEnv``
    """
    started: list[PebbleEnv] = []

    def make(
        env: Mapping[str, str] | None = None,
        validity: int | None = None,
        retry_after: int | Mapping[str, int] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> PebbleEnv:
        instance = PebbleEnv(
            tmp_path_factory.mktemp("pebble"),
            env=env,
            validity=validity,
            retry_after=retry_after,
            config=config,
        )
        started.append(instance)  # registered before start(): a half-started one is stopped too
        return instance.start()

    try:
        yield make
    finally:
        for instance in reversed(started):
            instance.stop()
