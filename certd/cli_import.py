"""``certd import certbot [DIR] [--write]``: move certbot's lineages to certd (docs/MIGRATING.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from certd.config import Config
from certd.core.errors import UsageError

EXIT_OK = 0


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("import", help="take over certificates from another ACME client")
    isub = i.add_subparsers(dest="import_command", metavar="SOURCE", parser_class=parser_class)
    c = isub.add_parser("certbot", help="certbot's lineages, current certificates and accounts (printed for "
                        "review; --write appends and imports)")
    c.add_argument("dir", nargs="?", default="/etc/letsencrypt", metavar="DIR",
                   help="certbot's config dir (default /etc/letsencrypt)")
    c.add_argument("--write", action="store_true", help="append the tables to the configuration and import "
                   "each current certificate as version 1 and certbot's account")


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def cmd_import(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    if args.import_command != "certbot":
        raise UsageError("import: a SOURCE is required: certbot (see --help)")
    from certd.engine import certbot_import
    certbot_dir = Path(args.dir).expanduser().absolute()
    cfg = load_config(args)
    lineages, refused = certbot_import.plan(certbot_dir)
    for line in refused:
        _note(line)
    if not args.write:
        for lin in lineages:
            print(lin.toml)
        for lin in lineages:
            for line in lin.notes:
                _note(line)
        _note(f"nothing written; review the tables above, then: certd import certbot {certbot_dir} --write")
        return EXIT_OK
    return _write(cfg, lineages, certbot_dir)


def _write(cfg: Config, lineages: list[Any], certbot_dir: Path) -> int:
    from certd.engine import certbot_apply
    from certd.store.files import open_file_store
    store = open_file_store(cfg, audit_group=cfg.daemon.control_group)
    lineages = certbot_apply.refuse_taken(cfg, store, lineages, _note)
    if not lineages:
        _note("nothing to import")
        return EXIT_OK
    text = certbot_apply.appended_config(cfg, lineages, certbot_dir)  # checked before anything is imported
    for lin in lineages:
        issuing = next((c.name for c in cfg.cas if c.directory.rstrip("/") == str(lin.server).rstrip("/")), None)
        version = certbot_apply.import_lineage(store, lin, certbot_dir, issuing)
        state = " (commented out: finish it)" if lin.commented else ""
        print(f"{lin.name}: serial {lin.bundle.info.serial} imported as version {version}{state}")
        for line in lin.notes:
            _note(line)
    servers = {str(lin.server).rstrip("/") for lin in lineages}  # several CAs: the one that is certbot's
    directory = next((c.directory for c in cfg.cas if c.directory.rstrip("/") in servers), cfg.acme.directory)
    certbot_apply.import_accounts(store, lineages, certbot_dir, directory, print)
    certbot_apply.write_config(cfg, text)
    print(f"appended {len(lineages)} [[certificate]] table(s) to {cfg.path}")
    print("steps left:\n"
          "  1. stop certbot renewing: systemctl disable --now certbot.timer (or remove its cron entry, "
          "/etc/cron.d/certbot)\n"
          f"  2. remove certbot's hooks ({certbot_dir}/renewal-hooks/) once certd's reload entries cover them\n"
          "  3. `certd check-config`, then `certd reload` (or start certd); certd renews from here on and keeps "
          "certbot's live/ paths current as plain files\n"
          "  4. when ready, point your servers at certd's paths ([certificate.deploy] live_dir) and drop the "
          "deploy.files entries")
    return EXIT_OK
