"""TOML configuration -> frozen dataclasses, validated once.

Every problem becomes one line ``<file>: <key>: <what is wrong and what is expected>``; all
problems are collected before :class:`~certd.core.errors.ConfigError` is raised, so an operator
fixes them in one pass. Relative paths resolve against the config file's directory.

This module holds the types; :mod:`certd.config.loading` the entry points (load, parse);
:mod:`certd.config.parse` builds the types section by section, :mod:`certd.config.values`
parses the scalars (durations, addresses, domains). ``certd.config`` re-exports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Mapping

from certd.core.policy import RenewBefore
from certd.core.release import Rollout

DEFAULT_PATH = Path("/etc/certd/certd.toml")
DEFAULT_EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # hooks' PATH when unset

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
CHALLENGES = ("http-01", "dns-01", "tls-alpn-01", "dns-persist-01")
FILE_CONTENTS = ("cert", "chain", "fullchain", "privkey", "combined")
HOOK_KINDS = ("nginx", "haproxy")

KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
Challenge = Literal["http-01", "dns-01", "tls-alpn-01", "dns-persist-01"]


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
    """``[alerts]``: where webhook notifications go (see certd/ops/alerts.py)."""

    webhook_url: str
    bearer_token: str | None = field(default=None, repr=False)   # a secret: never logged
    bearer_token_file: Path | None = None                          # read at every delivery
    timeout: float = 5.0                                            # per attempt


@dataclass(frozen=True)
class AcmeConfig:
    """One CA: ``[acme]`` (named "default") or one ``[[ca]]`` table."""

    directory: str
    email: str | None = None
    agree_tos: bool = False
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    order_timeout: float = 90.0     # seconds for one whole order, newOrder to the certificate
    eab_hmac_key_file: Path | None = None  # where eab_hmac_key was read from, if a file
    staging_directory: str | None = None   # what `certd renew --dry-run` orders from
    name: str = "default"                  # [[ca]] name; [acme] is the one CA "default"
    trust_anchors: Path | None = None      # roots verify trusts for this CA's chains (beside the endpoint's)
    table: str = "[acme]"                  # where its keys are, for messages: [acme] or [[ca]] "name"


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
    profile: str | None = None            # ACME profile the order must get (draft-ietf-acme-profiles)
    preferred_profile: str | None = None  # ... or one used only when the CA offers it
    preferred_chain: str | None = None    # issuer CN of the chain's topmost certificate (RFC 8555 §7.4.2)
    ip_addresses: tuple[str, ...] = ()    # RFC 8738 identifiers beside domains (compressed text form)
    dns_persist_hook: tuple[str, ...] = ()  # dns-persist-01: publishes the one persistent TXT record
    # Key classes (certd/config/keyclass.py): the settings above are already the effective ones
    # (the certificate's own, else its class's, else the default); ``origins`` says which rule
    # set each class-able setting ("certificate", "key_class NAME" or "default").
    key_class: str | None = None
    max_key_age: float | None = None   # seconds: re-key once the key is this old, even if valid
    destroy_after: float | None = None  # seconds: destroy a retired version's key after this long
    origins: tuple[tuple[str, str], ...] = ()
    ca: tuple[str, ...] = ()             # [[ca]] names in the order tried; () = every CA in file order
    rollout: Rollout | None = None       # [certificate.rollout]: a fleet releases new versions in steps

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Every name ordered for: the domains, then the IP addresses."""
        return self.domains + self.ip_addresses

    def origin(self, setting: str) -> str:
        """Which rule decided ``setting``: "certificate", "key_class NAME" or "default"."""
        return dict(self.origins).get(setting, "default")


@dataclass(frozen=True)
class KeyClassConfig:
    """``[[key_class]]``: settings certificates inherit with ``key_class = "NAME"``; None means
    the class leaves that setting to the default. Durations in seconds."""

    name: str
    key_type: str | None = None
    reuse_key: bool | None = None
    max_key_age: float | None = None
    renew_before: RenewBefore | None = None
    keep_versions: int | None = None
    destroy_after: float | None = None


@dataclass(frozen=True)
class KeysConfig:
    """``[keys]``: stored private keys sealed under a key-encryption key (certd/crypto/custody.py).

    Exactly one KEK source: ``kek_file`` (32 bytes, ``certd kek init``), ``kek_credential`` (the
    name of a systemd credential, read from ``$CREDENTIALS_DIRECTORY``), or ``kek`` (a
    ``pkcs11:token=...;object=...`` URI with ``pkcs11_module`` and ``pkcs11_pin_file``)."""

    kek_file: Path | None = None
    kek_credential: str | None = None
    kek: str | None = None
    pkcs11_module: Path | None = None
    pkcs11_pin_file: Path | None = None
    old_kek_files: tuple[Path, ...] = ()
    backup_recipient: str | None = None

    @property
    def kek_source(self) -> str:
        if self.kek is not None:
            return self.kek
        if self.kek_credential is not None:
            return f"credential {self.kek_credential}"
        return str(self.kek_file)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: this node is one of a fleet sharing a PostgreSQL database (certd/store/pg.py).

    ``database`` is a libpq URI or key=value string without a password; the password comes from
    ``password_file`` (read when connecting) or libpq's own passfile. ``node`` names this node
    in the database (default: the host name)."""

    database: str
    node: str
    password_file: Path | None = None
    sslmode: str | None = None
    sslrootcert: Path | None = None
    reconcile_interval: float = 30.0


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    acme: AcmeConfig
    certificates: tuple[CertificateConfig, ...]
    alerts: AlertsConfig | None = None
    keys: KeysConfig | None = None   # None: keys stored unencrypted (as before [keys] existed)
    key_classes: tuple[KeyClassConfig, ...] = ()
    cluster: ClusterConfig | None = None  # None: a single host, its state in daemon.state_dir
    cas: tuple[AcmeConfig, ...] = ()   # every CA in file order; () = just ``acme``
    # The file's identity when it was read (see certd.config.cache.file_identity): what the
    # read-only caches (parsed config, status index) are keyed by; None when parsed from text.
    source: tuple[Any, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # ``acme`` is the first CA: what code reading one CA (the daemon's probe, imports) uses
        if not self.cas:
            object.__setattr__(self, "cas", (self.acme,))

    def ca_config(self, name: str | None) -> AcmeConfig | None:
        """The CA named ``name`` (None: the first), or None when none is configured by that name."""
        if name is None:
            return self.acme
        return next((ca for ca in self.cas if ca.name == name), None)

    def issuing_ca(self, meta: Mapping[str, Any]) -> AcmeConfig | None:
        """The configured CA that issued the version with ``meta``: the table with its recorded
        ``ca`` name and ``ca_directory``, else one with that directory (the [[ca]] table was
        renamed), else the one with that name (its directory URL changed); a version from
        before several CAs (neither recorded) was issued by [acme], the CA named "default"
        (else the first). None when that CA is no longer configured."""
        name, directory = meta.get("ca"), meta.get("ca_directory")
        if not isinstance(name, str) and not isinstance(directory, str):
            return self.ca_config("default") or self.acme
        if not isinstance(directory, str):
            return self.ca_config(name) if isinstance(name, str) else None
        # two tables may share a CA (the name decides); certbot's server may differ by a trailing "/";
        # a table whose directory URL changed (a proxy in front, a new URL) is still the same CA
        same = [ca for ca in self.cas if ca.directory.rstrip("/") == directory.rstrip("/")]
        named = self.ca_config(name) if isinstance(name, str) else None
        return next((ca for ca in same if ca.name == name), same[0] if same else named)

    def cas_for(self, cert: CertificateConfig) -> tuple[AcmeConfig, ...]:
        """The CAs ``cert`` is ordered from, in order (its ``ca`` list, else every CA)."""
        if not cert.ca:
            return self.cas
        return tuple(ca for name in cert.ca if (ca := self.ca_config(name)) is not None)

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
