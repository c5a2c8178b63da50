"""Real nginx and HAProxy servers on loopback, plus a throwaway CA to give them certificates.

Fixtures (registered as a pytest plugin by ``tests/conftest.py``):

- ``nginx_factory(cert_path, key_path, *, server_name="_", extra="", extra_http="", port=None)``
  -> :class:`NginxServer`: ``.port``, ``.config``, ``.pid`` (master), ``.error_log``,
  ``.reload()``, ``.stop()``, ``.kill()``, ``.served()``. nginx runs as root in the foreground
  (``daemon off; master_process on; worker_processes 1``) with every path under a temp dir.
- ``haproxy_factory(combined_path, *, port=None, extra_bind="", extra_global="")`` -> :class:`HaproxyServer`:
  ``.port``, ``.socket`` (admin socket, ``level admin``), ``.crt`` (the path as written in
  haproxy.cfg), ``.pid``, ``.command(text)``, ``.stop()``, ``.kill()``, ``.served()``.
- ``test_ca`` -> :class:`TestCA`; ``other_ca`` -> a second, unrelated :class:`TestCA`.

Every server listens on a free ``127.0.0.1`` port, is ready (accepts TLS handshakes) when the
factory returns, runs in its own process group and is stopped by PID at teardown (the whole
group, so nginx workers never outlive a test). Helpers :func:`write_version` and
:func:`switch_live` lay out a ``live_dir`` the way ``certd.deploy.stage`` does (a symlink to a
version directory, switched by one ``rename()``), so tests can swap certificates atomically.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certd.core.model import Bundle
from tests.support.procs import free_port

NGINX = os.environ.get("CERTD_TEST_NGINX", "nginx")
HAPROXY = os.environ.get("CERTD_TEST_HAPROXY", "haproxy")
START_TIMEOUT = 10.0


# --- throwaway CA ------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestCA:
    """A root and an intermediate; leaves are signed by the intermediate.

    ``root_path`` is a trust-anchor file holding the root only, so a handshake validates only
    when the server sends the intermediate too (as a real fullchain does).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "certd test") -> None:
        now = dt.datetime.now(dt.timezone.utc)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca_cert(_name(f"{name} root"), self.root_key.public_key(),
                                  _name(f"{name} root"), self.root_key, now, path_len=1)
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._ca_cert(_name(f"{name} intermediate"), self.int_key.public_key(),
                                          self.root.subject, self.root_key, now, path_len=0)
        directory.mkdir(parents=True, exist_ok=True)
        self.root_path = directory / f"{name.replace(' ', '-')}-root.pem"
        self.root_path.write_bytes(_cert_pem(self.root))

    @staticmethod
    def _ca_cert(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, now: dt.datetime, path_len: int) -> x509.Certificate:
        return (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(signer, hashes.SHA256()))

    def issue(self, *domains: str, days: float = 30.0,
              not_before: dt.datetime | None = None) -> Bundle:
        """A fresh ECDSA P-256 leaf for ``domains`` (DNS SANs, first one also the CN)."""
        start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(_name(domains[0])).issuer_name(self.intermediate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.int_key, hashes.SHA256()))
        return Bundle(cert_pem=_cert_pem(cert), chain_pem=_cert_pem(self.intermediate), key_pem=_key_pem(key))


def fingerprint(bundle: Bundle) -> str:
    """Hex SHA-256 of the bundle's leaf DER (what ``CertInfo.fingerprint_sha256`` holds)."""
    return bundle.info.fingerprint_sha256


def write_version(versions_dir: Path, version: int, bundle: Bundle) -> Path:
    """Write ``versions_dir/NNNN/{cert,chain,fullchain,privkey}.pem`` and return that directory."""
    vdir = versions_dir / f"{version:04d}"
    vdir.mkdir(parents=True)
    (vdir / "cert.pem").write_bytes(bundle.cert_pem)
    (vdir / "chain.pem").write_bytes(bundle.chain_pem)
    (vdir / "fullchain.pem").write_bytes(bundle.fullchain_pem)
    fd = os.open(vdir / "privkey.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bundle.key_pem)
    return vdir


def switch_live(live_dir: Path, target: Path) -> None:
    """Point the ``live_dir`` symlink at ``target`` with one ``rename()`` of a fresh symlink."""
    tmp = live_dir.with_name(f".{live_dir.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.rename(tmp, live_dir)


def write_combined(path: Path, bundle: Bundle) -> Path:
    """Write fullchain + key to ``path`` (0600) by temp file + rename, as HAProxy reads it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bundle.combined_pem)
    os.rename(tmp, path)
    return path


# --- processes -----------------------------------------------------------------------------


def _new_group_dying_with_parent() -> None:
    """preexec_fn: own process group (so teardown can take workers too) and SIGTERM when the
    test runner dies, so a killed pytest leaves no servers behind."""
    os.setpgid(0, 0)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def served_leaf(port: int, sni: str = "localhost", host: str = "127.0.0.1",
                timeout: float = 2.0) -> x509.Certificate:
    """The leaf certificate a TLS client receives from ``host:port`` (no verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def served_fingerprint(port: int, sni: str = "localhost", host: str = "127.0.0.1") -> str:
    """Hex SHA-256 of the served leaf's DER."""
    return hashlib.sha256(served_leaf(port, sni, host).public_bytes(serialization.Encoding.DER)).hexdigest()


class _Server:
    """One server process in its own process group; signals only the PIDs it started."""

    name = "server"

    def __init__(self, argv: list[str], workdir: Path, port: int) -> None:
        self.argv = argv
        self.workdir = workdir
        self.port = port
        self.output = workdir / "output.log"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def _start(self) -> None:
        with open(self.output, "ab") as out:
            self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, cwd=self.workdir,
                                           preexec_fn=_new_group_dying_with_parent)

    def _wait_ready(self, extra: Callable[[], bool] = lambda: True) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited ({self._popen.returncode if self._popen else '?'}):"
                                   f"\n{self.log_tail()}")
            try:
                served_leaf(self.port, timeout=1.0)
                if extra():
                    return
            except (OSError, ssl.SSLError) as e:
                last = e
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"{self.name} not accepting TLS on 127.0.0.1:{self.port} after "
                           f"{START_TIMEOUT:g}s (last: {last!r}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.output, self.workdir / "error.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def served(self, sni: str = "localhost") -> str:
        """Fingerprint (hex SHA-256 of the leaf DER) a client receives right now."""
        return served_fingerprint(self.port, sni)

    def _killpg(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the server, wait for it, then SIGKILL whatever is left of its group."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._killpg(signal.SIGKILL)  # stragglers (nginx workers) if the master died first
        self._popen.wait()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash) and reap the server."""
        if self._popen is None:
            return
        self._killpg(signal.SIGKILL)
        self._popen.wait()


# --- nginx ---------------------------------------------------------------------------------


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok\\n"; }}
{extra}
    }}
{extra_http}
}}
"""


class NginxServer(_Server):
    name = "nginx"

    def __init__(self, workdir: Path, port: int, cert: Path, key: Path, *, server_name: str,
                 extra: str, extra_http: str) -> None:
        self.config = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        self.pid_file = workdir / "nginx.pid"
        self.config.write_text(NGINX_CONF.format(dir=workdir, port=port, cert=cert, key=key,
                                                 server_name=server_name, extra=extra,
                                                 extra_http=extra_http))
        super().__init__([NGINX, "-e", str(self.error_log), "-c", str(self.config)], workdir, port)

    def start(self) -> NginxServer:
        self._start()
        # ready = handshakes work and the pid file names our master (`nginx -s` needs it)
        self._wait_ready(lambda: self.pid_file.exists() and
                         self.pid_file.read_text().strip() == str(self.pid))
        return self

    def reload(self) -> subprocess.CompletedProcess[str]:
        """``nginx -s reload -c <config>`` (checks the config, then HUPs the master)."""
        return subprocess.run([NGINX, "-e", str(self.error_log), "-s", "reload", "-c", str(self.config)],
                              capture_output=True, text=True, timeout=10)

    def worker_pids(self) -> list[int]:
        """PIDs of the master's current children (its workers)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]


# --- HAProxy -------------------------------------------------------------------------------


HAPROXY_CFG = """\
global
    stats socket {socket} mode 600 level admin
    maxconn 256
{extra_global}

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend fe
    bind 127.0.0.1:{port} ssl crt {crt}{extra_bind}
    http-request return status 200 content-type text/plain string "ok"
"""


class HaproxyServer(_Server):
    name = "haproxy"

    def __init__(self, workdir: Path, port: int, crt: Path, *, extra_bind: str,
                 extra_global: str = "") -> None:
        self.config = workdir / "haproxy.cfg"
        self.socket = workdir / "admin.sock"
        self.crt = str(crt)
        self.config.write_text(HAPROXY_CFG.format(socket=self.socket, port=port, crt=crt,
                                                  extra_bind=extra_bind, extra_global=extra_global))
        super().__init__([HAPROXY, "-db", "-f", str(self.config)], workdir, port)

    def start(self) -> HaproxyServer:
        self._start()
        self._wait_ready(self.socket.exists)
        return self

    def command(self, text: str, timeout: float = 5.0) -> str:
        """Send one runtime-API command on the admin socket and return the reply text."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(text.encode() + (b"" if text.endswith("\n") else b"\n"))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway root + intermediate; ``.root_path`` is the trust-anchor file."""
    return TestCA(tmp_path_factory.mktemp("ca"), "certd test")


@pytest.fixture
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A second CA, unrelated to ``test_ca`` (for "wrong trust anchors" cases)."""
    return TestCA(tmp_path_factory.mktemp("ca"), "other test")


def _start_with_retries(make: Callable[[int], _Server], port: int | None) -> _Server:
    """Start a server; on a port race (someone took the free port first) try another port."""
    for attempt in range(3):
        server = make(port if port is not None else free_port())
        try:
            server.start()  # type: ignore[attr-defined]
            return server
        except RuntimeError as e:
            server.kill()
            if port is not None or "in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NginxServer]]:
    """Start nginx serving ``cert_path``/``key_path`` on 127.0.0.1; stopped at teardown."""
    servers: list[_Server] = []

    def start(cert_path: Path | str, key_path: Path | str, *, server_name: str = "_",
              extra: str = "", extra_http: str = "", port: int | None = None) -> NginxServer:
        workdir = tmp_path_factory.mktemp("nginx")
        server = _start_with_retries(
            lambda p: NginxServer(workdir, p, Path(cert_path), Path(key_path), server_name=server_name,
                                  extra=extra, extra_http=extra_http), port)
        servers.append(server)
        return server  # type: ignore[return-value]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def haproxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., HaproxyServer]]:
    """Start HAProxy terminating TLS with ``combined_path`` on 127.0.0.1; stopped at teardown."""
    servers: list[_Server] = []

    def start(combined_path: Path | str, *, port: int | None = None, extra_bind: str = "",
              extra_global: str = "") -> HaproxyServer:
        workdir = tmp_path_factory.mktemp("haproxy")
        server = _start_with_retries(
            lambda p: HaproxyServer(workdir, p, Path(combined_path), extra_bind=extra_bind,
                                    extra_global=extra_global), port)
        servers.append(server)
        return server  # type: ignore[return-value]

    yield start
    for server in servers:
        server.stop()
