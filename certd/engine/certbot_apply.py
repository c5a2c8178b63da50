"""``certd import certbot --write``: append the translated tables to the configuration (only
when the result still loads) and import each lineage's current version and its account."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from certd import config as config_mod
from certd import fs as fsutil
from certd.config import Config
from certd.core.errors import ConfigError, UsageError
from certd.core.events import LifecycleEvent
from certd.engine import keyage
from certd.engine.certbot_import import Lineage, account_of
from certd.store.files import FileStore

Say = Callable[[str], None]


def _isoformat(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat()


def refuse_taken(cfg: Config, store: FileStore, lineages: list[Lineage], say: Say) -> list[Lineage]:
    """The lineages whose name is free: not configured, no stored versions (one line each)."""
    configured = {c.name for c in cfg.certificates}
    free, seen = [], set()
    for lin in lineages:
        if lin.name in configured or lin.name in seen:
            say(f"{lin.name}: not imported: a certificate of that name is already configured")
        elif store.versions(lin.name):
            say(f"{lin.name}: not imported: the state dir already holds versions of it")
        else:
            free.append(lin)
            seen.add(lin.name)
    return free


def appended_config(cfg: Config, lineages: list[Lineage], certbot_dir: Path) -> str:
    """The configuration with the tables appended, checked to load: a table that would break
    it raises (ConfigError names why) before anything is written or imported."""
    old = cfg.path.read_text(encoding="utf-8")
    stamp = _isoformat(datetime.now(timezone.utc))[:19]
    new = old.rstrip("\n") + f"\n\n# --- imported from certbot ({certbot_dir}) {stamp} ---\n\n" \
        + "\n".join(lin.toml for lin in lineages)
    try:
        config_mod.parse(tomllib.loads(new), cfg.path)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the translated tables do not parse as TOML ({e}); nothing written") from None
    except ConfigError as e:
        raise ConfigError([f"{p} (in the translated tables; nothing written)" for p in e.problems]) from None
    return new


def write_config(cfg: Config, text: str) -> None:
    """Replace the configuration atomically, keeping its mode."""
    fsutil.atomic_write(cfg.path, text.encode("utf-8"), mode=cfg.path.stat().st_mode & 0o7777)


def import_lineage(store: FileStore, lin: Lineage, certbot_dir: Path, ca: str | None = None) -> int:
    """Store the lineage's current certificate as the current version (1 in a fresh name);
    ``ca`` names the configured CA whose directory is certbot's server (ARI and ``replaces``
    go to it; None: the configured CA whose directory is certbot's server, if any)."""
    info, now = lin.bundle.info, datetime.now(timezone.utc)
    source = str(certbot_dir / "live" / lin.conf.name)
    with store.lock(lin.name):
        version = store.add_version(lin.name, lin.bundle, {
            "created": _isoformat(now), "initiator": f"uid={os.getuid()}", "reason": "imported from certbot",
            "serial": info.serial, "not_after": _isoformat(info.not_after),
            "fingerprint_sha256": info.fingerprint_sha256, "replaces": None,
            keyage.KEY_CREATED: _isoformat(info.not_before), "imported_from": source,
            **({"ca": ca} if ca else {}),
            # certbot's server: the issuing CA even when no configured CA has that directory
            # (then none is asked for ARI or sent replaces: no other CA knows the certificate)
            **({"ca_directory": str(lin.server)} if lin.server else {}),
        })
        store.set_current(lin.name, version)
    store.audit.append(LifecycleEvent(
        "imported", lin.name, now, initiator=f"uid={os.getuid()}", reason="imported from certbot",
        new_serial=info.serial, spki_sha256=info.spki_sha256, not_after=info.not_after, version=version,
        detail={"source": source}))
    return version


def import_accounts(store: FileStore, lineages: list[Lineage], certbot_dir: Path, directory: str, say: Say) -> None:
    """Each distinct certbot account, keyed by its server's directory URL; one already stored
    for that URL is kept (certd may have registered its own since)."""
    done: set[tuple[str, str]] = set()
    for lin in lineages:
        if (lin.server, lin.account_id) in done:
            continue
        done.add((lin.server, lin.account_id))
        try:
            account = account_of(lin, certbot_dir)
        except UsageError as e:
            say(f"{lin.name}: account not imported: {e}; certd will register its own")
            continue
        if account is None:
            continue
        with store.account_lock(account.server):
            if store.load_account(account.server) is not None:
                say(f"account for {account.server}: certd already has one; certbot's ({account.uri}) not imported")
                continue
            store.save_account(account.server, account.key_pem, account.registration_json)
        say(f"account {account.uri} imported for {account.server}")
        if account.server.rstrip("/") != directory.rstrip("/"):
            say(f"note: [acme] directory is {directory}, certbot's server {account.server}: certd uses the "
                "imported account only when they are the same")
