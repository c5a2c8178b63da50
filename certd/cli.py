"""The command line (docs/CONTRACT.md): parse, run one command, map errors to exit codes.

Exit codes: 0 success or nothing to do; 1 an operation failed (renewal, verification, rollback
happened); 2 usage or configuration error. Errors are one line on stderr; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from certd import __version__, cli_backup, cli_cluster, cli_fleet, cli_import, cli_keys, cli_output
from certd import config as config_mod
from certd.ops import log as logmod
from certd.config import Config
from certd.config import cache as config_cache
from certd.core.errors import AcmeError, CertdError, ConfigError, UsageError
from certd.cli_backends import Local, Remote, daemon_client
from certd.core.textsafe import check_reason

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too, but prints usage; keep one line
        sub = self.prog.removeprefix("certd").strip()  # main() prints the "certd: " prefix once
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see --help)")


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
    r.add_argument("--force", action="store_true", help="renew now even if not due (also: try now although "
                   "held or rate limited after a CA refusal)")
    r.add_argument("--ignore-duplicate-limit", action="store_true",
                   help="with --force: renew even past the CA's 5 certificates per name set per week")
    r.add_argument("--reason", default="", help="why (recorded with your identity)")
    r.add_argument("--wait", action="store_true", help="show the steps as they happen and exit with the outcome")
    r.add_argument("--dry-run", action="store_true", help="a full order against the staging_directory of each "
                   "certificate's first CA (or --server) and the pre-store checks; nothing stored, deployed or "
                   "reloaded")
    r.add_argument("--server", metavar="URL", help="with --dry-run: the ACME directory to order from")

    s = sub.add_parser("status", help="one row per certificate")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wide", action="store_true", help="every domain (default: the first 3 and a count)")
    s.add_argument("--fleet", action="store_true", help="[cluster]: per node, the version applied and served")

    v = sub.add_parser("verify", help="handshake-check the live endpoints now")
    v.add_argument("names", nargs="*", metavar="NAME")

    d = sub.add_parser("drift", help="compare configured, stored, deployed and served; exit 1 on any mismatch")
    d.add_argument("names", nargs="*", metavar="NAME")
    d.add_argument("--json", action="store_true")

    rb = sub.add_parser("rollback", help="switch back to an earlier version, reload, verify")
    rb.add_argument("name", metavar="NAME")
    rb.add_argument("--to", type=int, metavar="VERSION", dest="to_version")
    rb.add_argument("--reason", default="")

    rv = sub.add_parser("revoke", help="revoke the current certificate at the CA; keyCompromise re-keys at once")
    rv.add_argument("name", metavar="NAME")
    rv.add_argument("--reason", required=True, metavar="CODE",
                    help="keyCompromise | superseded | cessationOfOperation | affiliationChanged")

    h = sub.add_parser("history", help="the audit trail")
    h.add_argument("name", nargs="?", metavar="NAME")
    h.add_argument("--json", action="store_true")

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", parser_class=_Parser)
    av = asub.add_parser("verify", help="check the audit log's hash chain")
    av.add_argument("--head", metavar="HASH", help="also require this record hash, kept elsewhere, to be in the chain")

    sub.add_parser("reload", help="tell the running daemon to re-read its configuration")
    dp = sub.add_parser("dns-persist-record", help="print the persistent TXT record dns-persist-01 needs")
    dp.add_argument("name", metavar="NAME")
    cli_keys.add_parsers(sub, _Parser)
    cli_backup.add_parsers(sub, _Parser)
    cli_import.add_parsers(sub, _Parser)
    cli_cluster.add_parsers(sub, _Parser)
    cli_fleet.add_parsers(sub, _Parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    logmod.setup(logging.DEBUG if debug else logging.WARNING)
    try:
        args = build_parser().parse_args(args_list)
        if args.command is None:
            raise UsageError("a COMMAND is required (see --help)")
        if args.command == "run":
            logmod.setup(logging.DEBUG if debug else logging.INFO)
        code = COMMANDS[args.command](args)
        cli_output.flush()
        return code
    except BrokenPipeError as e:
        if not cli_output.stdout_closed():
            return _internal_error(e, debug)
        cli_output.reader_left()  # the reader left early (`certd status | head -1`): quiet, like git log
        return EXIT_OK
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
        return _internal_error(e, debug)


def _internal_error(e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"certd: internal error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
    return EXIT_FAILED


def load_config(args: argparse.Namespace, *, check_runtime: bool = False) -> Config:
    return config_mod.load(config_mod.resolve_path(args.config), check_runtime=check_runtime)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args, check_runtime=True)
    from certd.deploy import strictmodes
    errors, warnings = strictmodes.config_report(cfg)
    for w in warnings:
        print(f"certd: WARNING: {w}", file=sys.stderr)
    if errors:
        for e in errors:
            print(f"certd: {cfg.path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    n = len(cfg.certificates)
    print(f"{cfg.path}: OK ({n} certificate{'s' if n != 1 else ''}: {cfg.names_summary()})")
    print(cli_keys.check_line(cfg))
    return EXIT_OK


def _backend(args: argparse.Namespace) -> Any:
    """The daemon when it runs (so one process owns the schedule), else in-process."""
    client = daemon_client(args.config)
    return Remote(client) if client is not None else Local(load_config(args))


def _progress(name: str, message: str) -> None:
    print(f"  {name}: {message}", file=sys.stderr, flush=True)


def cmd_renew(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    if args.server is not None:
        raise UsageError("--server goes with --dry-run (renewals order from [acme] directory)")
    if args.force and not args.names and not args.all:
        raise UsageError("name the certificates to renew, or pass --all")
    if args.ignore_duplicate_limit and not args.force:
        raise UsageError("--ignore-duplicate-limit goes with --force (only a forced renewal can hit the limit)")
    check_reason(args.reason)
    backend = _backend(args)
    try:
        progress = _progress if (args.wait or sys.stderr.isatty()) else None
        reason = args.reason or ("forced by operator" if args.force else "")
        outcomes = backend.renew(args.names, args.all, args.force, reason, args.wait or isinstance(backend, Local),
                                 progress, ignore_duplicate_limit=args.ignore_duplicate_limit)
    finally:
        backend.close()
    for o in outcomes:
        print(f"{o['name']}: {o['message']}")
    return EXIT_OK if all(o["ok"] for o in outcomes) else EXIT_FAILED


def _dry_run(args: argparse.Namespace) -> int:
    """In-process always: nothing it does touches the daemon's schedule or files but the staging
    account (and a daemon renewal using the same http-01 port at that moment would clash)."""
    if args.force or args.ignore_duplicate_limit:
        raise UsageError("--dry-run orders every named certificate (or --all) whether due or not; drop --force")
    if args.server is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", args.server):
        raise UsageError(f"--server {args.server!r}: expected the ACME directory URL, e.g. https://ca.example/dir")
    from certd.daemon.wiring import build_manager
    from certd.engine.manager import whoami
    mgr = build_manager(load_config(args), maintenance=False)
    try:
        certs = mgr.select([] if args.all or not args.names else args.names)
        outcomes = mgr.dry_run(certs, server=args.server, initiator=whoami(), progress=_progress)
        for o in outcomes:
            mgr.emit("dry_run", o.name, initiator=whoami(), outcome="success" if o.ok else "failed",
                     reason=args.reason or "dry run", new_serial=o.serial, detail={"message": o.message})
    finally:
        mgr.close()
    for o in outcomes:
        print(f"{o.name}: {o.message}")
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


def cmd_dns_persist_record(args: argparse.Namespace) -> int:
    """The zone-file lines for the certificate's names on the configured CA and account
    (registering the account if needed: the record names it)."""
    from certd.acme.issuer import Issuer
    from certd.daemon.wiring import build_manager
    mgr = build_manager(load_config(args), maintenance=False)
    try:
        cert = mgr.select([args.name])[0]
        cas = mgr.config.cas_for(cert)
        lines: list[str] = []
        failed: list[str] = []   # one line per CA that did not answer: the others' records still print
        for ca in cas:  # several CAs: each names its own issuer and account
            issuer = mgr.ports.issuer_at(ca.name)
            assert isinstance(issuer, Issuer)
            try:
                lines += issuer.persist_records(cert)
            except AcmeError as e:
                if len(cas) == 1:
                    raise  # one CA: its error is the command's, as it always was
                said = re.sub(r";\s*(will retry|not retrying)\b.*$", "", str(e))  # the daemon's next step: not ours
                failed.append(f"CA {ca.name}: no record printed: {said}; run this again once it answers")
    finally:
        mgr.close()
    if cert.challenge != "dns-persist-01":
        print(f"certd: note: {cert.name} uses {cert.challenge}; set challenge = \"dns-persist-01\" to use these",
              file=sys.stderr)
    if lines:
        print(f"; publish once for {cert.name}; certd changes no DNS record per order afterwards")
    for line in lines:
        print(line)
    for line in failed:
        print(f"certd: {line}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.fleet:
        return cli_fleet.cmd_status_fleet(args, load_config(args))
    client = daemon_client(args.config)
    # Without a daemon: the config as last validated when the file is unchanged (a changes-nothing
    # command; check-config and run validate afresh): see certd.config.cache
    backend = Remote(client) if client is not None else \
        Local(config_cache.load_for_reading(config_mod.resolve_path(args.config)))
    if args.json:
        sys.stdout.write(backend.status_json(args.names))
        return EXIT_OK
    rows = backend.status(args.names)
    for r in rows:
        r["domains"] = cli_output.status_domains([*(r.get("domains") or []), *(r.get("ip_addresses") or [])], args.wide)
    cli_output.print_table(rows, cli_output.status_columns(rows))
    for row in rows:  # a renewal waiting for the CA: when the next try is, and how to try now
        if row.get("state") in ("held", "rate_limited"):
            print(f"{row['name']}: {row.get('renewal_reason')}")
    for r in rows:  # a CA that does not answer: the table's LAST RESULT alone does not say whose trouble it is
        if r.get("ca_unreachable"):
            print(f"{r['name']}: CA unreachable: {r.get('last_error')}")
    for r in rows:  # a broken certificate says why, whatever the table shows
        if r.get("state") == "broken":
            print(f"{r['name']}: broken: {r.get('broken_reason')}")
    for line in backend.custody():
        print(line)
    return EXIT_OK


def cmd_drift(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        report = backend.drift(args.names)
    finally:
        backend.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from certd.verify.drift import lines
        print("\n".join(lines(report)))
    return EXIT_FAILED if report["drift"] else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    outcomes = _backend(args).verify(args.names)
    for o in outcomes:
        print(f"{o['name']}: {'OK' if o['result'] == 'verified' else o['result'].upper()}: {o['message']}")
    return EXIT_OK if all(o["result"] in ("verified", "not_due") for o in outcomes) else EXIT_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    check_reason(args.reason)
    o = _backend(args).rollback(args.name, args.to_version, args.reason or "rollback by operator", _progress)
    if o["result"] == "refused":  # through the daemon: the same one stderr line as in-process
        raise UsageError(o["message"])
    print(f"{o['name']}: {o['message']}")
    return EXIT_OK if o["ok"] else EXIT_FAILED


def cmd_revoke(args: argparse.Namespace) -> int:
    from certd.engine.lifecycle import parse_reason
    reason = parse_reason(args.reason)
    backend = _backend(args)
    try:
        o = backend.revoke(args.name, reason, _progress)
    finally:
        backend.close()
    if o["result"] == "refused":  # through the daemon: the same one stderr line as in-process
        raise UsageError(o["message"])
    print(f"{o['name']}: {o['message']}")
    return EXIT_OK if o["ok"] else EXIT_FAILED


def cmd_history(args: argparse.Namespace) -> int:
    from certd.ops import audit
    from certd.daemon.control_client import rows_document
    client = daemon_client(args.config)  # the daemon reads the 0700 state dir for control_group members
    if client is not None:
        doc = client.get("/v1/history", params={"name": args.name} if args.name is not None else None)
    else:
        cfg = load_config(args)
        doc = cli_cluster.history_document(cfg, args.name) if cfg.cluster is not None else \
            audit.history(cfg.daemon.state_dir, args.name, set(cfg.names), cfg.names_summary())
    rows = doc["records"]
    if not doc["chain_intact"]:
        print("certd: warning: the audit log's hash chain is broken; run certd audit verify", file=sys.stderr)
    if args.json:
        sys.stdout.write(rows_document("records", rows))
        return EXIT_OK
    for r in rows:
        r["serials"] = cli_output.history_serials(r)
    cli_output.print_table(rows, [("TIME", "time"), ("EVENT", "event"), ("NAME", "name"), ("INITIATOR", "initiator"),
                        ("OUTCOME", "outcome"), ("SERIALS", "serials"), ("REASON", "reason")])
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from certd.ops import audit
    if args.audit_command != "verify":
        raise UsageError("audit: a SUBCOMMAND is required: verify (see --help)")
    cfg = load_config(args)
    if args.head is not None and not re.fullmatch(r"[0-9a-f]{64}", args.head):
        raise UsageError(f"--head {args.head!r}: expected a record hash, 64 lower-case hex digits")
    if cfg.cluster is not None:  # the fleet's chain, in the database
        return cli_cluster.audit_verify(cfg, args.head)
    v = audit.open_for(cfg.daemon.state_dir).verify(expect_head=args.head)
    return cli_output.report_verification(v, str(cfg.daemon.state_dir / audit.FILENAME))


def cmd_reload(args: argparse.Namespace) -> int:
    from certd.daemon.control_client import ControlClient, DaemonNotRunning
    # The file may be broken: that is what the daemon reports. Only find its socket here.
    sock = config_mod.peek_control_socket(config_mod.resolve_path(args.config))
    client = ControlClient(sock)
    try:
        client.probe()
    except DaemonNotRunning:
        raise UsageError(f"no daemon listens on {sock}; nothing to reload") from None
    result = client.call("/v1/reload", {})
    if not result["ok"]:
        for problem in result["problems"]:
            print(f"certd: {problem}", file=sys.stderr)
        print("certd: the daemon keeps running its previous configuration", file=sys.stderr)
        return EXIT_USAGE
    print("configuration reloaded")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from certd.daemon.service import Daemon
    return Daemon(config_mod.resolve_path(args.config)).run()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "renew": cmd_renew,
    "status": cmd_status,
    "verify": cmd_verify,
    "drift": cmd_drift,
    "rollback": cmd_rollback,
    "reload": cmd_reload,
    "revoke": cmd_revoke,
    "history": cmd_history,
    "audit": cmd_audit,
    "kek": lambda args: cli_keys.cmd_kek(args, load_config),
    "backup": lambda args: cli_backup.cmd_backup(args, load_config),
    "import": lambda args: cli_import.cmd_import(args, load_config),
    "cluster": lambda args: cli_cluster.cmd_cluster(args, load_config),
    "nodes": lambda args: cli_fleet.cmd_nodes(args, load_config),
    "release": lambda args: cli_fleet.cmd_release(args, load_config),
    "dns-persist-record": cmd_dns_persist_record,
}


if __name__ == "__main__":
    sys.exit(main())
