"""The command line (CONTRACT.md): parse, run one command, map errors to exit codes.

Exit codes: 0 success or nothing to do; 1 an operation failed (renewal, verification, rollback
happened); 2 usage or configuration error. Errors are one line on stderr; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from certd import __version__, config as config_mod
from certd import log as logmod
from certd.config import Config
from certd.errors import CertdError, ConfigError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too, but prints usage; keep one line
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="certd", description="TLS certificate rotation daemon: renew over ACME, deploy "
                "atomically, verify the live handshake, roll back by itself.")
    p.add_argument("--config", metavar="PATH", help="config file (default: $CERTD_CONFIG, else /etc/certd/certd.toml)")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--version", action="version", version=f"certd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("run", help="run the daemon (systemd's ExecStart)")
    sub.add_parser("check-config", help="validate the configuration; one line per problem")

    r = sub.add_parser("renew", help="renew what is due (or everything named, with --force)")
    r.add_argument("names", nargs="*", metavar="NAME")
    r.add_argument("--all", action="store_true", help="every configured certificate")
    r.add_argument("--force", action="store_true", help="renew now even if not due")
    r.add_argument("--reason", default="", help="why (recorded with your identity)")
    r.add_argument("--wait", action="store_true", help="show the steps as they happen and exit with the outcome")

    s = sub.add_parser("status", help="one row per certificate")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="handshake-check the live endpoints now")
    v.add_argument("names", nargs="*", metavar="NAME")

    rb = sub.add_parser("rollback", help="switch back to an earlier version, reload, verify")
    rb.add_argument("name", metavar="NAME")
    rb.add_argument("--to", type=int, metavar="VERSION", dest="to_version")
    rb.add_argument("--reason", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    logmod.setup(logging.DEBUG if debug else logging.WARNING)
    try:
        args = build_parser().parse_args(args_list)
        if args.command is None:
            raise UsageError("certd: a COMMAND is required (see --help)")
        if args.command == "run":
            logmod.setup(logging.DEBUG if debug else logging.INFO)
        return COMMANDS[args.command](args)
    except CertdError as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, ConfigError):
            for problem in e.problems:
                print(f"certd: {problem}", file=sys.stderr)
        else:
            print(f"certd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"certd: internal error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return EXIT_FAILED


def load_config(args: argparse.Namespace, *, check_runtime: bool = False) -> Config:
    return config_mod.load(config_mod.resolve_path(args.config), check_runtime=check_runtime)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args, check_runtime=True)
    n = len(cfg.certificates)
    print(f"{cfg.path}: OK ({n} certificate{'s' if n != 1 else ''}: {', '.join(cfg.names) or 'none'})")
    return EXIT_OK


def _manager(args: argparse.Namespace) -> Any:
    from certd.manager import Manager
    return Manager(load_config(args))


def _names(args: argparse.Namespace, mgr: Any, *, require: bool = False) -> list[Any]:
    if require and not args.names and not getattr(args, "all", False):
        raise UsageError("name the certificates to renew, or pass --all")
    return mgr.select([] if getattr(args, "all", False) else args.names)


def _progress(name: str, message: str) -> None:
    print(f"  {name}: {message}", file=sys.stderr, flush=True)


def cmd_renew(args: argparse.Namespace) -> int:
    from certd.manager import whoami
    if args.force and not args.reason:
        print("certd: note: --force without --reason; recording 'forced by operator'", file=sys.stderr)
    mgr = _manager(args)
    try:
        certs = _names(args, mgr, require=args.force)
        progress = _progress if (args.wait or sys.stderr.isatty()) else None
        outcomes = mgr.renew(certs, force=args.force, reason=args.reason or ("forced by operator" if args.force else ""),
                             initiator=whoami(), progress=progress)
    finally:
        mgr.close()
    for o in outcomes:
        print(f"{o.name}: {o.message}")
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    rows = [mgr.status(c) for c in _names(args, mgr)]
    if args.json:
        json.dump({"certificates": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    _print_table(rows, [("NAME", "name"), ("STATE", "state"), ("VER", "version"), ("SERIAL", "serial"),
                        ("NOT AFTER", "not_after"), ("NEXT RENEWAL", "next_renewal"), ("LAST RESULT", "last_result"),
                        ("DOMAINS", "domains")])
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    outcomes = [mgr.verify_now(c) for c in _names(args, mgr)]
    for o in outcomes:
        print(f"{o.name}: {'OK' if o.result == 'verified' else o.result.upper()}: {o.message}")
    return EXIT_OK if all(o.result in ("verified", "not_due") for o in outcomes) else EXIT_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    from certd.manager import whoami
    mgr = _manager(args)
    cert = mgr.select([args.name])[0]
    o = mgr.rollback(cert, to_version=args.to_version, reason=args.reason or "rollback by operator",
                     initiator=whoami(), progress=_progress)
    print(f"{o.name}: {o.message}")
    return EXIT_OK if o.ok else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    raise UsageError("certd run: the daemon is not built yet; use 'certd renew' from a timer meanwhile")


def _print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, list):
            return ",".join(map(str, v))
        return str(v)
    table = [[h for h, _ in cols]] + [[cell(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "renew": cmd_renew,
    "status": cmd_status,
    "verify": cmd_verify,
    "rollback": cmd_rollback,
}


if __name__ == "__main__":
    sys.exit(main())
