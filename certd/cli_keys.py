"""``certd kek init`` and ``certd kek rotate``: the key-encryption key (docs/KEYS.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from certd.cli_backends import daemon_client
from certd.config import Config
from certd.core.errors import UsageError

EXIT_OK = 0


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("kek", help="the key-encryption key that seals stored private keys ([keys])")
    ksub = k.add_subparsers(dest="kek_command", metavar="SUBCOMMAND", parser_class=parser_class)
    ki = ksub.add_parser("init", help="create a new KEK ([keys] kek_file, or --file; a PKCS#11 kek on its token)")
    ki.add_argument("--file", metavar="PATH", help="create this file instead of [keys] kek_file (for a rotation)")
    kr = ksub.add_parser("rotate", help="re-wrap every stored key under a new KEK (through the daemon when it runs)")
    kr.add_argument("--new", required=True, metavar="FILE|URI", help="the new KEK: a file from `certd kek init "
                    "--file`, or a pkcs11: URI on the configured module")


def cmd_kek(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    if args.kek_command == "init":
        return _init(args, load_config(args))
    if args.kek_command == "rotate":
        return _rotate(args, load_config)
    raise UsageError("kek: a SUBCOMMAND is required: init or rotate (see --help)")


def _init(args: argparse.Namespace, cfg: Config) -> int:
    from certd.crypto import kekload
    keys = cfg.keys
    if args.file is None and keys is not None and keys.kek is not None:
        kek = kekload.generate_token_kek(keys)
        print(f"created KEK {kek.kek_id} on the token ({keys.kek}); it never leaves it")
        return EXIT_OK
    if args.file is not None:
        path = Path(args.file).expanduser().absolute()
    elif keys is not None and keys.kek_file is not None:
        path = keys.kek_file
    else:
        raise UsageError("kek init: name the file: `certd kek init --file /etc/certd/kek`, then add [keys] "
                         "kek_file = \"/etc/certd/kek\" to the configuration")
    kek_id = kekload.create_kek_file(path, owner_like=cfg.daemon.state_dir)
    print(f"created KEK {kek_id} in {path} (mode 0600); keep a copy offline: without it no sealed key opens")
    return EXIT_OK


def _rotate(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    source = args.new if args.new.startswith("pkcs11:") else str(Path(args.new).expanduser().absolute())
    client = daemon_client(args.config)
    if client is not None:
        result = client.call("/v1/kek/rotate", {"new": source})
    else:
        from certd.daemon.wiring import build_manager, rotate_kek_with
        from certd.engine.manager import whoami
        cfg = load_config(args)
        if cfg.keys is None:
            raise UsageError("kek rotate: no [keys] section: keys are stored unencrypted; add [keys] with kek_file "
                             "(see `certd kek init`) first")
        mgr = build_manager(cfg)
        try:
            result = rotate_kek_with(mgr, source, whoami())
        finally:
            mgr.close()
    print(f"re-wrapped {result['rewrapped']} keys under KEK {result['to']} (was {result['from']})")
    for kek_id, n in sorted(result["left"].items()):
        print(f"certd: warning: {n} keys are still {'plain' if kek_id == 'plain' else 'under ' + kek_id}",
              file=sys.stderr)
    if result["next"]:
        print(f"next: {result['next']}")
    return EXIT_OK


def check_line(cfg: Config) -> str:
    """``check-config``'s line on key custody; loading the KEK proves it is usable
    (:class:`~certd.crypto.custody.CustodyError` says what to fix)."""
    if cfg.keys is None:
        return (f"keys: stored unencrypted in {cfg.daemon.state_dir} (no [keys] section; see docs/KEYS.md to seal "
                f"them under a key-encryption key)")
    from certd.store.files import keyring_of
    ring, _ = keyring_of(cfg)  # ConfigError (exit 2) when the KEK cannot be loaded
    assert ring is not None
    old = len(ring.kek_ids) - 1
    return (f"keys: sealed under KEK {ring.current.kek_id} ({cfg.keys.kek_source})"
            + (f"; {old} older KEK{'s' if old != 1 else ''} accepted for opening" if old else ""))
