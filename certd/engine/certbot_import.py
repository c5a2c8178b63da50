"""``certd import certbot``: translate certbot lineages into ``[[certificate]]`` tables and
import each one's current certificate (as version 1, so nothing is re-issued) and its ACME
account (so the CA sees the same account and ARI ``replaces`` keeps working). docs/MIGRATING.md.

Lineages whose challenge needs the operator's decision (a DNS plugin: which hook; nginx,
apache, manual: certd does not edit web server configs nor ask a human) are written commented
out, so an appended configuration always loads; their version is still imported, so
uncommenting them re-issues nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from certd.config import KEY_TYPES
from certd.core.errors import CertdError, UsageError
from certd.core.model import Bundle, CertInfo, key_type_of
from certd.crypto.keys import load_private_key
from certd.engine.certbot_read import (CertbotAccount, RenewalConf, current_files, live_path, read_account,
                                       renewal_confs, webroot_paths)

#: A hook needing any of these is shell code, not a command: refused, never guessed at.
SHELL_CHARS = frozenset("|;&><$`()*?~{}[]\\\n#")  # quotes are fine: shlex splits them as sh would
DNS_HOOK_PLACEHOLDER = "/path/to/your-dns-hook"
LIVE_FILES = (("cert", "cert.pem"), ("chain", "chain.pem"), ("fullchain", "fullchain.pem"), ("privkey", "privkey.pem"))


@dataclass
class Lineage:
    """One lineage translated: its table (``commented`` when the operator must finish it),
    the notes printed about it, and what will be imported."""

    name: str
    conf: RenewalConf
    bundle: Bundle
    toml: str = ""
    commented: bool = False
    notes: list[str] = field(default_factory=list)
    server: str = ""
    account_id: str = ""


def certd_name(certbot_name: str) -> str:
    """certbot's lineage name made valid for certd (letters, digits, ``. _ -``, 64 at most)."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in certbot_name)
    name = name.lstrip("._-")[:64]
    return name or "certbot"


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(value, ensure_ascii=False)


def _argv(argv: list[str]) -> str:
    return "[" + ", ".join(_q(a) for a in argv) + "]"


def translate_hook(key: str, command: str) -> tuple[list[str] | None, str]:
    """A certbot hook as an argv (absolute program), or None and the one-line reason."""
    if set(command) & SHELL_CHARS:
        return None, f"{key} = {command!r} needs a shell (|;&<>$` etc.); put it in a script and add " \
                     "[[certificate.reload]] command = [\"/abs/script\"]"
    argv = shlex.split(command)
    if not argv:
        return None, f"{key} is empty"
    exe = argv[0] if argv[0].startswith("/") else shutil.which(argv[0])
    if exe is None or not os.access(exe, os.X_OK):
        return None, f"{key} = {command!r}: {argv[0]!r} is not an executable on this host; certd runs commands by " \
                     "absolute path: add [[certificate.reload]] command = [\"/abs/path\", ...] yourself"
    return [exe, *argv[1:]], ""


def _challenge(lin: Lineage) -> list[str]:
    """The challenge lines; sets ``commented`` and notes when the operator must decide."""
    params = lin.conf.params
    auth = params.get("authenticator", "")
    if auth == "webroot":
        roots = webroot_paths(lin.conf)
        if len(roots) > 1:
            lin.notes.append(f"{lin.name}: certbot used {len(roots)} webroots; certd uses one for all names "
                             f"({roots[0]}): make it serve /.well-known/acme-challenge/ for every domain")
        if not roots:
            lin.commented = True
            lin.notes.append(f"{lin.name}: webroot without a path in {lin.conf.path}: fill in http01_webroot")
            return ['challenge = "http-01"', f"http01_webroot = {_q('/path/to/webroot')}"]
        return ['challenge = "http-01"', f"http01_webroot = {_q(roots[0])}"]
    if auth == "standalone":
        host = params.get("http01_address") or "0.0.0.0"
        host = f"[{host}]" if ":" in host else host
        port = params.get("http01_port") or "80"
        return ['challenge = "http-01"', f"http01_listen = {_q(f'{host}:{port}')}"]
    lin.commented = True
    if auth.startswith("dns-"):
        lin.notes.append(f"{lin.name}: certbot's {auth} plugin has no certd equivalent: set dns01_hook to a "
                         "program called as <hook> set|clear <domain> <txt value> (hooks/ has examples), "
                         "then uncomment the table")
        return ['challenge = "dns-01"', f"dns01_hook = {_argv([DNS_HOOK_PLACEHOLDER])}"]
    lin.notes.append(f"{lin.name}: certbot's {auth or 'unknown'} authenticator is not translated (certd neither "
                     "edits web server configs nor asks a human): point http01_webroot at a directory your server "
                     "serves as /.well-known/acme-challenge/, or use http01_listen, then uncomment the table")
    return ['challenge = "http-01"', f"http01_webroot = {_q('/path/to/webroot')}"]


def _options(lin: Lineage) -> list[str]:
    params, out = lin.conf.params, []
    if params.get("preferred_chain"):
        out.append(f"preferred_chain = {_q(params['preferred_chain'])}")
    if params.get("required_profile"):
        out.append(f"profile = {_q(params['required_profile'])}")
    elif params.get("preferred_profile"):
        out.append(f"preferred_profile = {_q(params['preferred_profile'])}")
    if params.get("reuse_key", "").lower() == "true":
        out.append("reuse_key = true")
    return out


def _deploy_and_hooks(lin: Lineage, certbot_dir: Path) -> list[str]:
    out = ["", "[certificate.deploy]", "# certbot's old paths, until your servers point at certd's: each "
           "symlink into archive/ is replaced by a plain file at the next switch"]
    for content, default in LIVE_FILES:
        path = live_path(lin.conf, certbot_dir, content, default)
        out += ["", "[[certificate.deploy.files]]", f"path = {_q(str(path))}", f"content = {_q(content)}"]
    seen: set[tuple[str, ...]] = set()
    for key in ("deploy_hook", "renew_hook", "post_hook"):
        command = lin.conf.params.get(key)
        if not command:
            continue
        argv, why = translate_hook(key, command)
        if argv is None:
            lin.notes.append(f"{lin.name}: hook refused: {why}")
        elif tuple(argv) not in seen:  # certbot writes --deploy-hook as both deploy_hook and renew_hook
            seen.add(tuple(argv))
            out += ["", "[[certificate.reload]]", f"command = {_argv(argv)}"]
    if lin.conf.params.get("pre_hook"):
        lin.notes.append(f"{lin.name}: pre_hook {lin.conf.params['pre_hook']!r} not carried over: certd deploys "
                         "without stopping anything (its http-01 responder needs its port free, though)")
    return out


def _key_type(lin: Lineage) -> str:
    key_type = key_type_of(load_private_key(lin.bundle.key_pem))
    if key_type not in KEY_TYPES:
        raise UsageError(f"{lin.conf.path}: the lineage's key is {key_type}; certd supports {', '.join(KEY_TYPES)}")
    return key_type


def translate(conf: RenewalConf, certbot_dir: Path) -> Lineage:
    """One lineage as a table; :class:`CertdError` (one line) when it cannot be imported at all."""
    cert_pem, chain_pem, key_pem = current_files(conf, certbot_dir)
    bundle = Bundle(cert_pem, chain_pem, key_pem)
    try:
        info: CertInfo = bundle.info
    except ValueError:
        raise UsageError(f"{conf.path}: the current certificate does not parse") from None
    lin = Lineage(certd_name(conf.name), conf, bundle, server=conf.params.get("server", ""),
                  account_id=conf.params.get("account", ""))
    if lin.name != conf.name:
        lin.notes.append(f"{lin.name}: renamed from certbot's {conf.name!r} (certd names are letters, digits, . _ -)")
    mapped = set(conf.webroot_map)
    if mapped and mapped != set(info.domains):
        lin.notes.append(f"{lin.name}: the certificate names {sorted(info.domains)}, the webroot map "
                         f"{sorted(mapped)}; the certificate's names are used")
    lines = ["[[certificate]]", f"name = {_q(lin.name)}",
             f"domains = {_argv(list(info.domains))}",
             *([f"ip_addresses = {_argv(list(info.ip_addresses))}"] if info.ip_addresses else []),
             f"key_type = {_q(_key_type(lin))}", *_challenge(lin), *_options(lin),
             *_deploy_and_hooks(lin, certbot_dir)]
    header = f"# from certbot lineage {conf.name!r} ({conf.path})"
    body = "\n".join(lines)
    if lin.commented:
        body = "\n".join(f"# {line}" if line else "#" for line in lines)
        header += ": finish and uncomment"
    lin.toml = f"{header}\n{body}\n"
    return lin


def plan(certbot_dir: Path) -> tuple[list[Lineage], list[str]]:
    """Every lineage translated, and one line for each that cannot be."""
    lineages, refused = [], []
    for conf in renewal_confs(certbot_dir):
        try:
            lineages.append(translate(conf, certbot_dir))
        except CertdError as e:
            refused.append(f"{conf.name}: not imported: {e}")
    return lineages, refused


def account_of(lin: Lineage, certbot_dir: Path) -> CertbotAccount | None:
    """The lineage's account, or None when the conf names none."""
    if not lin.server or not lin.account_id:
        return None
    return read_account(certbot_dir, lin.server, lin.account_id)
