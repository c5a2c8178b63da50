"""Reading a certbot configuration directory (``/etc/letsencrypt``): renewal configs, the
current files of each lineage and its ACME account. Pure reading: nothing here writes.

certbot writes ConfigObj files; the subset it writes (``key = value``, ``[renewalparams]``,
``[[webroot_map]]``) parses with :mod:`configparser` once the top-level keys get a section and
the nested header's extra brackets are accepted.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from certd.core.errors import UsageError

TOP = "__top__"


@dataclass(frozen=True)
class RenewalConf:
    """One ``renewal/<name>.conf``: the top-level keys, ``[renewalparams]`` and its webroot map."""

    name: str
    path: Path
    top: dict[str, str]
    params: dict[str, str]
    webroot_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CertbotAccount:
    """An account as certd stores it: the key as PEM (secret) and the registration JSON."""

    server: str
    uri: str
    key_pem: bytes
    registration_json: str


def read_conf(path: Path) -> RenewalConf:
    """Parse one renewal config; :class:`UsageError` names the file when it does not parse."""
    parser = configparser.RawConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys (domains) as written
    parser.SECTCRE = re.compile(r"\[+(?P<header>[^]]+)\]+")  # [[webroot_map]] is a section too
    try:
        parser.read_string(f"[{TOP}]\n" + path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise UsageError(f"{path}: not a certbot renewal config ({str(e).splitlines()[0]})") from None

    def section(name: str) -> dict[str, str]:
        return dict(parser.items(name)) if parser.has_section(name) else {}

    return RenewalConf(path.name.removesuffix(".conf"), path, section(TOP), section("renewalparams"),
                       section("webroot_map"))


def renewal_confs(certbot_dir: Path) -> list[RenewalConf]:
    """Every lineage's renewal config under ``certbot_dir``, by name."""
    renewal = certbot_dir / "renewal"
    if not renewal.is_dir():
        raise UsageError(f"{certbot_dir}: no renewal/ directory; is this certbot's config dir "
                         "(default /etc/letsencrypt, or its --config-dir)?")
    try:
        paths = sorted(p for p in renewal.iterdir() if p.name.endswith(".conf"))
    except OSError as e:
        raise UsageError(f"{renewal}: cannot list it ({e.strerror}); run as the user certbot ran as") from None
    if not paths:
        raise UsageError(f"{renewal}: no *.conf: certbot has no lineages here")
    return [read_conf(p) for p in paths]


def webroot_paths(conf: RenewalConf) -> list[str]:
    """certbot's webroot_path (a ConfigObj list: ``a,`` or ``a, b``) plus the map's values."""
    listed = [p.strip() for p in conf.params.get("webroot_path", "").split(",") if p.strip()]
    return list(dict.fromkeys([*listed, *conf.webroot_map.values()]))


def current_files(conf: RenewalConf, certbot_dir: Path) -> tuple[bytes, bytes, bytes]:
    """The lineage's current (cert, chain, privkey) PEM, read through its live/ symlinks."""
    def read(key: str, default: str) -> bytes:
        raw = conf.top.get(key) or str(certbot_dir / "live" / conf.name / default)
        path = _rebase(Path(raw), conf, certbot_dir)
        try:
            return path.read_bytes()
        except OSError as e:
            raise UsageError(f"{conf.path}: cannot read {key} {path}: {e.strerror}") from None
    return read("cert", "cert.pem"), read("chain", "chain.pem"), read("privkey", "privkey.pem")


def live_path(conf: RenewalConf, certbot_dir: Path, key: str, default: str) -> Path:
    """Where certbot serves ``key`` (cert/chain/fullchain/privkey) for this lineage."""
    return _rebase(Path(conf.top.get(key) or str(certbot_dir / "live" / conf.name / default)), conf, certbot_dir)


def _rebase(path: Path, conf: RenewalConf, certbot_dir: Path) -> Path:
    """A copied certbot dir keeps its old absolute paths: follow them into ``certbot_dir``."""
    old_root = conf.params.get("config_dir")
    if old_root and not path.exists() and path.is_relative_to(old_root):
        return certbot_dir / path.relative_to(old_root)
    return path


def account_dir(certbot_dir: Path, server: str, account_id: str) -> Path:
    """certbot keeps accounts under ``accounts/<host[:port]><path>/<id>``."""
    url = urlsplit(server)
    return certbot_dir / "accounts" / (url.netloc + url.path) / account_id


def read_account(certbot_dir: Path, server: str, account_id: str) -> CertbotAccount:
    """The account as certd's store keeps it: certbot's JWK as PKCS#8 PEM, regr.json checked
    as an ACME registration resource (``{"body": ..., "uri": ...}``, certd's own format)."""
    import josepy as jose
    from acme import messages
    where = account_dir(certbot_dir, server, account_id)
    try:
        jwk = jose.JWK.json_loads((where / "private_key.json").read_text(encoding="utf-8"))
        regr = messages.RegistrationResource.json_loads((where / "regr.json").read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{where}: cannot read certbot's account ({e.strerror})") from None
    except (ValueError, jose.DeserializationError):
        raise UsageError(f"{where}: certbot's account files do not parse (private_key.json, regr.json)") from None
    if not regr.uri:
        raise UsageError(f"{where}/regr.json: no account URI")
    key_pem = jwk.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return CertbotAccount(server, str(regr.uri), key_pem, regr.json_dumps())
