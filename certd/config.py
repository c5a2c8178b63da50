"""TOML configuration -> frozen dataclasses, validated once.

Every problem becomes one line ``<file>: <key>: <what is wrong and what is expected>``; all
problems are collected before :class:`~certd.errors.ConfigError` is raised, so an operator
fixes them in one pass. Relative paths resolve against the config file's directory.

This module holds the types and the entry points (load, parse); config_parse.py builds the
types section by section, config_values.py parses the scalars (durations, addresses, domains).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from certd.errors import ConfigError

DEFAULT_PATH = Path("/etc/certd/certd.toml")
DEFAULT_EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # hooks' PATH when unset

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
CHALLENGES = ("http-01", "dns-01", "tls-alpn-01")
FILE_CONTENTS = ("cert", "chain", "fullchain", "privkey", "combined")
HOOK_KINDS = ("nginx", "haproxy")

KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
Challenge = Literal["http-01", "dns-01", "tls-alpn-01"]


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = Path("/var/lib/certd")
    control_socket: Path = Path("/run/certd/control.sock")
    control_group: str | None = None
    metrics_listen: Listen | None = None
    workers: int = 4
    ca_probe_interval: float = 30.0   # while certificates wait for an unreachable CA
    metrics_allow_remote: bool = False  # metrics_listen may be a non-loopback address
    metrics_textfile: Path | None = None  # node_exporter textfile collector output (*.prom)
    drift_interval: float = 300.0       # periodic drift reconcile (seconds)
    repair_drift: bool = False          # default for [certificate.deploy] repair_drift


@dataclass(frozen=True)
class AlertsConfig:
    """``[alerts]``: where webhook notifications go (see certd/alerts.py)."""

    webhook_url: str
    bearer_token: str | None = field(default=None, repr=False)   # a secret: never logged
    bearer_token_file: Path | None = None                          # read at every delivery
    timeout: float = 5.0                                            # per attempt


@dataclass(frozen=True)
class AcmeConfig:
    directory: str
    email: str | None = None
    agree_tos: bool = False
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    order_timeout: float = 90.0     # seconds for one whole order, newOrder to the certificate
    eab_hmac_key_file: Path | None = None  # where eab_hmac_key was read from, if a file


@dataclass(frozen=True)
class FileTarget:
    """One plain file written by temp file + fsync + rename (for software refusing symlinks)."""

    path: Path
    content: str  # one of FILE_CONTENTS
    owner: str | None = None
    group: str | None = None
    mode: int | None = None  # default: 0o600 for key material, 0o644 otherwise


@dataclass(frozen=True)
class DeployConfig:
    live_dir: Path | None = None
    combined: Path | None = None
    group: str | None = None
    files: tuple[FileTarget, ...] = ()
    repair_drift: bool | None = None   # None: the daemon's default ([daemon] repair_drift)


@dataclass(frozen=True)
class ReloadHook:
    """A built-in hook (``kind`` nginx / haproxy) or a command (``kind`` = "command")."""

    kind: str
    timeout: float = 30.0
    command: tuple[str, ...] = ()
    config: Path | None = None          # nginx: -c
    binary: str = "nginx"               # nginx: executable name or path
    socket: Path | None = None          # haproxy: admin socket
    crt: str | None = None              # haproxy: cert path as HAProxy knows it
    capabilities: tuple[str, ...] = ()  # command: the Linux capabilities it keeps (default none)


@dataclass(frozen=True)
class VerifyEndpoint:
    host: str
    port: int
    sni: str
    ca_bundle: Path | None = None  # trust anchors for the served chain; None = system store

    def __str__(self) -> str:
        return f"{Listen(self.host, self.port)} (SNI {self.sni})"


@dataclass(frozen=True)
class RenewBefore:
    """Renew when this fraction of the lifetime, or this much time, remains."""

    fraction: Fraction | None = None
    duration: timedelta | None = None


@dataclass(frozen=True)
class CertificateConfig:
    name: str
    domains: tuple[str, ...]
    key_type: str = "ecdsa-p256"
    reuse_key: bool = False
    challenge: str = "http-01"
    http01_listen: Listen | None = None
    http01_webroot: Path | None = None
    dns01_hook: tuple[str, ...] = ()
    tlsalpn01_listen: Listen | None = None
    renew_before: RenewBefore | None = None
    keep_versions: int = 5
    verify_timeout: float = 10.0
    deploy: DeployConfig = field(default_factory=DeployConfig)
    reload: tuple[ReloadHook, ...] = ()
    verify: tuple[VerifyEndpoint, ...] = ()
    insecure_shared_deploy_dir: bool = False   # unsafe deploy dirs: warn instead of refusing


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    acme: AcmeConfig
    certificates: tuple[CertificateConfig, ...]
    alerts: AlertsConfig | None = None

    def certificate(self, name: str) -> CertificateConfig:
        return self._by_name[name]  # KeyError for an unknown name

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def names_summary(self, limit: int = 8) -> str:
        """The configured names for a message: all of a few, the first ``limit`` of many."""
        names = self.names
        more = len(names) - limit
        return (", ".join(names[:limit]) + (f" and {more:,} more" if more > 0 else "")) or "none"

    @cached_property
    def _by_name(self) -> dict[str, CertificateConfig]:
        # The daemon looks certificates up by name after every job: a scan was O(n) each,
        # O(n^2) at start-up (2.5 s of it at 10,000 certificates).
        return {c.name: c for c in self.certificates}


def resolve_path(config_arg: str | None) -> Path:
    """``--config`` beats ``$CERTD_CONFIG`` beats the default."""
    return Path(config_arg or os.environ.get("CERTD_CONFIG") or DEFAULT_PATH)


_DAEMON_TABLE = re.compile(r"^[ \t]*\[[ \t]*daemon[ \t]*\][ \t]*(?:#[^\n]*)?$(.*?)(?=^[ \t]*\[|\Z)", re.M | re.S)


def peek_control_socket(path: Path) -> Path:
    """The control socket named in a config file that may be invalid (so ``certd reload`` can
    still reach the daemon and let it report the problems, and the CLI can ask the daemon
    without validating 10,000 certificates first); the default when it cannot tell.

    Only the ``[daemon]`` table is parsed when it can be cut out of the text (a whole file of
    10,000 certificates takes ~0.6 s to parse); anything unusual falls back to the whole file."""
    try:
        raw = _daemon_table(path.read_text("utf-8")).get("control_socket")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raw = None
    if not isinstance(raw, str) or not raw:
        return DaemonConfig.control_socket
    p = Path(raw).expanduser()
    return p if p.is_absolute() else path.resolve().parent / p


def _daemon_table(text: str) -> dict[str, Any]:
    m = _DAEMON_TABLE.search(text)
    if m is not None:
        try:
            return tomllib.loads(m.group(1))
        except tomllib.TOMLDecodeError:
            pass  # not cut out cleanly (a value spanning a line that starts with "["): whole file
    table = tomllib.loads(text).get("daemon", {})
    return table if isinstance(table, dict) else {}


def load(path: Path, *, check_runtime: bool = False) -> Config:
    """Read and validate ``path``. ``check_runtime`` also checks what only the daemon needs
    (the control socket's directory). Raises :class:`ConfigError` with every problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config PATH or set CERTD_CONFIG") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    return parse(data, path, check_runtime=check_runtime)


def parse(data: dict[str, Any], path: Path, *, check_runtime: bool = False) -> Config:
    from certd.config_parse import Parser  # it builds the types defined here
    p = Parser(path, check_runtime)
    config = p.config(data)
    if p.problems:
        raise ConfigError(p.problems)
    assert config is not None
    return config
