"""Run certd as users do: a config file on disk and the ``certd`` CLI (or daemon) as a process.

``CertdEnv`` writes ``certd.toml`` from plain dicts, runs commands, and reads ``status --json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certd.core.model import split_pem_chain

from tests.support.procs import ManagedProcess, wait_until

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "hooks"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(daemon: Mapping[str, Any], acme: Mapping[str, Any], certificates: Sequence[Mapping[str, Any]],
            alerts: Mapping[str, Any] | None = None, tables: Mapping[str, Mapping[str, Any]] | None = None,
            arrays: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> str:
    """The subset of TOML certd's config uses: two tables (more with ``alerts`` and ``tables``,
    e.g. ``{"keys": {...}}``), arrays of flat tables (``arrays``, e.g. ``{"key_class": [...]}``)
    and an array of certificate tables, each with an optional deploy table and arrays of
    reload / verify tables."""
    out = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    if acme:  # none: the CAs are [[ca]] tables (``arrays={"ca": [...]}``)
        out += ["", "[acme]"] + [f"{k} = {toml_value(v)}" for k, v in acme.items()]
    if alerts:
        out += ["", "[alerts]"] + [f"{k} = {toml_value(v)}" for k, v in alerts.items()]
    for table, values in (tables or {}).items():
        out += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for table, entries in (arrays or {}).items():
        for entry in entries:
            out += ["", f"[[{table}]]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    for cert in certificates:
        out += ["", "[[certificate]]"]
        out += [f"{k} = {toml_value(v)}" for k, v in cert.items() if k not in ("deploy", "reload", "verify")]
        if cert.get("deploy"):
            deploy = dict(cert["deploy"])
            files = deploy.pop("files", [])
            out += ["[certificate.deploy]"] + [f"{k} = {toml_value(v)}" for k, v in deploy.items()]
            for f in files:
                out += ["[[certificate.deploy.files]]"] + [f"{k} = {toml_value(v)}" for k, v in f.items()]
        for table in ("reload", "verify"):
            for entry in cert.get(table, []):
                out += [f"[[certificate.{table}]]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(out) + "\n"


class CertdEnv:
    """A certd installation in a temp dir, pointed at one Pebble."""

    def __init__(self, workdir: Path, pebble: Any) -> None:
        self.dir = workdir
        self.pebble = pebble
        self.state_dir = workdir / "state"
        self.config_path = workdir / "certd.toml"
        self.socket = workdir / "control.sock"
        self.root_path = workdir / "pebble-root.pem"
        self.certificates: list[dict[str, Any]] = []
        self.daemon_extra: dict[str, Any] = {}
        self.acme_extra: dict[str, Any] = {}
        self.alerts: dict[str, Any] | None = None   # the [alerts] table, when set
        self.extra_env: dict[str, str] = {}   # for every certd process (e.g. SOFTHSM2_CONF of a test token)
        self.tables: dict[str, dict[str, Any]] = {}  # more top-level tables, e.g. {"keys": {...}}
        self.arrays: dict[str, list[dict[str, Any]]] = {}  # arrays of tables, e.g. {"key_class": [...]}
        self.daemons: list[ManagedProcess] = []

    def refresh_root(self) -> Path:
        """Pebble makes a new root at every start: fetch the current one for verify's trust."""
        self.pebble.write_root(self.root_path)
        return self.root_path

    def http_cert(self, name: str, domains: Sequence[str], **kw: Any) -> dict[str, Any]:
        """A certificate validated by the built-in http-01 responder on Pebble's http port."""
        return {"name": name, "domains": list(domains), "challenge": "http-01",
                "http01_listen": f"127.0.0.1:{self.pebble.http_port}", **kw}

    def dns_cert(self, name: str, domains: Sequence[str], **kw: Any) -> dict[str, Any]:
        return {"name": name, "domains": list(domains), "challenge": "dns-01",
                "dns01_hook": [str(HOOKS / "dns-challtestsrv"), self.pebble.challtestsrv_url], **kw}

    def write_config(self, certificates: Sequence[Mapping[str, Any]] | None = None) -> Path:
        if certificates is not None:
            self.certificates = [dict(c) for c in certificates]
        daemon = {"state_dir": str(self.state_dir), "control_socket": str(self.socket), **self.daemon_extra}
        acme = {} if self.arrays.get("ca") else {
            "directory": self.pebble.directory_url, "email": "ops@example.test", "agree_tos": True,
            "ca_bundle": str(self.pebble.ca_bundle), **self.acme_extra}
        tmp = self.config_path.with_suffix(".tmp")
        # 0600 as an operator's config holding a secret must be (certd refuses inline secrets otherwise)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(to_toml(daemon, acme, self.certificates, self.alerts, self.tables, self.arrays))
        os.replace(tmp, self.config_path)
        return self.config_path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "certd.cli", "--config", str(self.config_path), *args]

    def run(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120,
            check: int | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **self.extra_env, **(env or {})}, cwd=ROOT)
        if check is not None and r.returncode != check:
            pytest.fail(f"certd {' '.join(args)} exited {r.returncode}, expected {check}\n"
                        f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r

    def status(self, *names: str) -> dict[str, dict[str, Any]]:
        r = self.run("status", "--json", *names, check=0)
        return {c["name"]: c for c in json.loads(r.stdout)["certificates"]}

    def renew_until_ari_finds(self, name: str) -> int:
        """Force renewals of ``name`` until Pebble's ARI can find its current certificate; its version.

        For tests that need an ARI answer for one certificate (see ``ari_finds``): about 1 in
        256 of Pebble's serials is one its ARI endpoint cannot look up.
        """
        from certd.store.files import FileStore
        from tests.support.pebble_fixtures import ari_finds

        store = FileStore(self.state_dir)
        version = self.status(name)[name]["version"]
        for _ in range(5):
            if ari_finds(store.load(name, version).bundle.cert_pem):
                return int(version)
            self.run("renew", name, "--force", "--reason", "a serial Pebble's ARI can find", check=0)
            version = self.status(name)[name]["version"]
        pytest.fail(f"Pebble's ARI could not find any of {name}'s last 5 certificates")

    def start_daemon(self, env: Mapping[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(self.argv("run"), env={**os.environ, **self.extra_env, **(env or {})},
                              log_path=self.dir / "daemon.log", cwd=ROOT)
        proc.start()
        self.daemons.append(proc)
        wait_until(lambda: self.socket.exists() or not proc.alive, timeout=30, what="certd control socket")
        if not proc.alive:
            pytest.fail(f"certd run exited early:\n{proc.log_text()}")
        return proc

    def close(self) -> None:
        """Stop every daemon this environment started (SIGTERM, then SIGKILL), by PID."""
        for proc in self.daemons:
            if proc.alive:
                proc.stop(timeout=30)


def key_matches(cert_path: Path, key_path: Path) -> bool:
    """Does the first certificate in ``cert_path`` belong to the key in ``key_path``?"""
    cert = x509.load_pem_x509_certificate(split_pem_chain(cert_path.read_bytes())[0])
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def certd_env(tmp_path: Path) -> Iterator[Callable[..., CertdEnv]]:
    """``certd_env(pebble, workdir=None)`` -> a CertdEnv whose daemons are stopped at teardown."""
    made: list[CertdEnv] = []

    def make(pebble: Any, workdir: Path | None = None) -> CertdEnv:
        env = CertdEnv(workdir or tmp_path, pebble)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()
