"""``certd cluster import`` (docs/FLEET.md "Moving a single host into a fleet"), and the audit
log read from the fleet's database for ``certd audit verify`` and ``certd history`` when the
configuration has ``[cluster]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from certd import cli_output
from certd.cli_backends import daemon_client
from certd.config import Config
from certd.core.errors import UsageError

if TYPE_CHECKING:
    from certd.ops.auditchain import Verification

EXIT_OK = 0
EXIT_FAILED = 1


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("cluster", help="a fleet of nodes on one database ([cluster])")
    csub = c.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", parser_class=parser_class)
    i = csub.add_parser("import", help="move [daemon] state_dir (versions, keys re-sealed, state, ACME accounts, "
                        "audit chain) into the [cluster] database; writes nothing to the state dir")
    i.add_argument("--skip-existing", action="store_true",
                   help="leave certificates the database already holds as they are (the fleet's version wins) and "
                        "import the rest, instead of refusing")


def cmd_cluster(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    if args.cluster_command != "import":
        raise UsageError("cluster: a SUBCOMMAND is required: import (see --help)")
    cfg = load_config(args)
    if cfg.cluster is None:
        raise UsageError(f"cluster import: {cfg.path} has no [cluster] section; add it (database, node, [keys]) to "
                         f"say which database to move {cfg.daemon.state_dir} into")
    if daemon_client(args.config) is not None:
        raise UsageError(f"cluster import: a certd daemon runs with {cfg.path}; stop it first (the import reads "
                         f"{cfg.daemon.state_dir} without taking its locks, so that it writes nothing there)")
    if not (cfg.daemon.state_dir / "certs").is_dir():
        raise UsageError(f"cluster import: {cfg.daemon.state_dir} holds no certificates ([daemon] state_dir); "
                         f"point state_dir at the single host's state directory")
    return _import(cfg, args.skip_existing)


def _import(cfg: Config, skip_existing: bool) -> int:
    from certd.core.clock import SystemClock
    from certd.engine.manager import whoami
    from certd.store.clusterimport import Importer
    from certd.store.files import keyring_of, open_file_store
    from certd.store.opening import open_cluster
    assert cfg.cluster is not None
    ring, _ = keyring_of(cfg)
    if ring is None:  # the config parser requires [keys] with [cluster]
        raise UsageError(f"cluster import: {cfg.path} needs [keys]: keys go into the database sealed only")
    source = open_file_store(cfg)
    with open_cluster(cfg) as target:
        report = Importer(source, target, ring, node=cfg.cluster.node, initiator=whoami(),
                          now=SystemClock().now()).run(skip_existing=skip_existing)
    for cert in report.moved:
        numbers = [v.version for v in cert.versions]
        span = f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else (str(numbers[0]) if numbers else "none")
        print(f"{cert.name}: versions {span} ({len(numbers)}), desired {cert.desired}, applied here "
              f"{cert.desired}{', state' if cert.state is not None else ''}"
              f"{', order in flight' if cert.order is not None else ''}")
    for name in report.resumed:
        print(f"{name}: already imported from this state dir (an earlier run)")
    for name in report.skipped:
        print(f"{name}: skipped: the database already holds it (--skip-existing)")
    audit = {"copied": f"{report.audit_records} audit records copied (the database's chain continues them)",
             "already": "audit records already copied",
             "pinned": f"the database already had an audit chain: its imported record pins this log's head "
                       f"({report.audit_records} records)",
             "none": "no audit records"}[report.audit]
    versions = sum(len(c.versions) for c in report.moved)
    print(f"imported {_n(len(report.moved), 'certificate')} ({_n(versions, 'version')}), "
          f"{_n(report.accounts, 'ACME account')}{_kept(report.accounts_kept)} and {audit} from "
          f"{cfg.daemon.state_dir} into the fleet database as node {cfg.cluster.node}; {cfg.daemon.state_dir} "
          f"was not changed")
    print("next: start `certd run` with this config; `certd status` now reads the database")
    return EXIT_OK


def _kept(n: int) -> str:
    return f" (and {n} the database had already)" if n else ""


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# --- the audit log in the database ---------------------------------------------------------------


def audit_verify(cfg: Config, head: str | None) -> int:
    """``certd audit verify`` on the fleet's chain (the same output and exit codes as on the
    file), plus the seam: a state dir imported into a database that already had a chain was
    pinned by its ``imported`` record, and the file on this host must still hold that head."""
    from certd.store.opening import open_cluster
    with open_cluster(cfg) as store:
        pg = store.audit
        v = pg.verify(expect_head=head)
        seams = [] if not v.ok else _seams(cfg, pg.records)
    for problem in seams:
        v.problems.append(problem)
    return cli_output.report_verification(v, "certd_audit in the fleet database")


def _seams(cfg: Config, records: list[dict[str, Any]]) -> list[str]:
    """Problems of the file logs this node's imports pinned (those still on this host)."""
    from certd.ops.audit import AuditLog
    assert cfg.cluster is not None
    problems = []
    for rec in records:
        detail = rec.get("detail") or {}
        pin = detail.get("source_audit")
        if rec.get("event") != "imported" or rec.get("name") or detail.get("audit") != "pinned" \
                or detail.get("node") != cfg.cluster.node or not isinstance(pin, dict):
            continue
        path = Path(str(pin.get("file")))
        if not path.exists():
            continue  # the host's old log was moved away: the pin is all that remains
        fv: Verification = AuditLog(path).verify(expect_head=str(pin.get("last_hash")))
        problems += [f"{path} (imported at seq {rec['seq']}): {p}" for p in fv.problems]
    return problems


def history_document(cfg: Config, name: str | None) -> dict[str, Any]:
    """``certd history`` from the fleet's chain: ``{"records": [...], "chain_intact": bool}``."""
    from certd.ops.audit import history_of
    from certd.store.opening import open_cluster
    with open_cluster(cfg) as store:
        pg = store.audit
        return history_of(pg.records, pg.verify().ok, name, set(cfg.names), cfg.names_summary())
