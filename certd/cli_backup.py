"""``certd backup export`` and ``certd backup restore``: sealed offline backups (docs/KEYS.md).

Both read or write the state directory directly (0700, certd's): run them as root or as
certd's user. Export reads safely beside a running daemon (each certificate under its lock);
restore refuses while a daemon serves the target configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from certd.cli_backends import daemon_client
from certd.config import Config
from certd.core.errors import UsageError

if TYPE_CHECKING:
    from certd.store.files import FileStore

EXIT_OK = 0


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("backup", help="sealed offline backups of every certificate version and key ([keys] "
                       "backup_recipient)")
    bsub = b.add_subparsers(dest="backup_command", metavar="SUBCOMMAND", parser_class=parser_class)
    be = bsub.add_parser("export", help="write every version, key, state and ACME account into FILE, sealed to the "
                         "age recipient [keys] backup_recipient")
    be.add_argument("file", metavar="FILE")
    br = bsub.add_parser("restore", help="open FILE with an age identity and write it into the configured state "
                         "dir, which must be empty; keys are sealed under its [keys] KEK")
    br.add_argument("file", metavar="FILE")
    br.add_argument("--identity", required=True, metavar="IDFILE",
                    help="the age identity file (AGE-SECRET-KEY-1...), readable by its owner only")


def cmd_backup(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    if args.backup_command == "export":
        return _export(args, load_config(args))
    if args.backup_command == "restore":
        return _restore(args, load_config)
    raise UsageError("backup: a SUBCOMMAND is required: export or restore (see --help)")


def _export(args: argparse.Namespace, cfg: Config) -> int:
    from certd.core.clock import SystemClock
    from certd.engine.manager import whoami
    from certd.store import backup
    recipient = cfg.keys.backup_recipient if cfg.keys is not None else None
    if recipient is None:
        raise UsageError(f"backup export: {cfg.path} sets no [keys] backup_recipient; add backup_recipient = "
                         f"\"age1...\" (`age-keygen -y` of an identity kept offline) to [keys]")
    backup.age()  # the missing extra is reported before the store is touched
    result = backup.export(_store(cfg), _path(args.file), recipient, initiator=whoami(), clock=SystemClock())
    print(f"exported {_n(result.certificates, 'certificate')} ({_n(result.versions, 'version')}) and "
          f"{_n(result.accounts, 'ACME account')} to {result.path} ({result.size} bytes, sha256 "
          f"{result.sha256[:16]}...), sealed to {recipient}; only its identity opens it: keep that offline")
    for w in result.warnings:
        print(f"certd: warning: {w}", file=sys.stderr)
    return EXIT_OK


def _restore(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    from certd.core.clock import SystemClock
    from certd.engine.manager import whoami
    from certd.store import backup
    cfg = load_config(args)
    backup.age()
    if daemon_client(args.config) is not None:
        raise UsageError(f"backup restore: a certd daemon runs with {cfg.path}; stop it first (a restore writes "
                         f"into a state dir nobody else is using)")
    result = backup.restore(_store(cfg), _path(args.file), _path(args.identity), initiator=whoami(),
                            clock=SystemClock())
    o = result.origin
    print(f"restored {_n(result.certificates, 'certificate')} ({_n(result.versions, 'version')}, desired versions "
          f"as backed up) and {_n(result.accounts, 'ACME account')} into {cfg.daemon.state_dir} "
          f"from a backup of {o.get('source_node')} made {o.get('created')}; keys {result.custody}")
    print("next: `certd status`; then `certd run` with [daemon] repair_drift = true deploys the desired versions "
          "at start, or `certd rollback NAME [--to N]` deploys an earlier one now (docs/KEYS.md)")
    for w in result.warnings:
        print(f"certd: warning: {w}", file=sys.stderr)
    return EXIT_OK


def _store(cfg: Config) -> FileStore:
    """The configured state dir as the daemon opens it (its audit log group-readable by control_group)."""
    from certd.store.files import open_file_store
    return open_file_store(cfg, audit_group=cfg.daemon.control_group)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _path(raw: str) -> Path:
    return Path(raw).expanduser().absolute()
