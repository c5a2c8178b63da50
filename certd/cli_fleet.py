"""The fleet's operator commands (docs/FLEET.md, "Operating a fleet"), read straight from the
shared database, so they answer on any node whether its daemon runs or not:

- ``certd status --fleet [--json]``: per certificate the desired version; per node the version
  it applied, the fingerprint its endpoints served, when that was verified, and its last error.
- ``certd nodes``: every node that ever joined, when it was last heard from, its software.
- ``certd nodes remove NODE``: the node no longer counts in the status (audited).
  With ``--json`` each certificate also lists its ``compromised_keys`` (keyCompromise): which
  live nodes still hold each one, and when its fleet-wide destruction completed.
- ``certd release hold NAME`` / ``resume NAME``: stop a release of NAME before its next widening
  step (the release in flight, or the next one) / let it go on (audited, with who asked).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from certd import cli_output
from certd.config import Config
from certd.core.clock import SystemClock
from certd.core.errors import UsageError
from certd.core.release import live_window

EXIT_OK, EXIT_FAILED = 0, 1


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    n = sub.add_parser("nodes", help="the fleet's nodes ([cluster]): last seen, software, removed")
    nsub = n.add_subparsers(dest="nodes_command", metavar="SUBCOMMAND", parser_class=parser_class)
    n.add_argument("--json", action="store_true")
    r = nsub.add_parser("remove", help="stop counting NODE in the fleet's status (its rows stay, for the record)")
    r.add_argument("node", metavar="NODE")
    r.add_argument("--reason", default="", help="why (recorded with your identity)")
    rel = sub.add_parser("release", help="hold or resume a fleet release ([certificate.rollout])")
    rsub = rel.add_subparsers(dest="release_command", metavar="SUBCOMMAND", parser_class=parser_class, required=True)
    for verb, text in (("hold", "stop NAME's release before promotion (the one in flight, or the next)"),
                       ("resume", "let NAME's held release go on")):
        h = rsub.add_parser(verb, help=text)
        h.add_argument("name", metavar="NAME")
        h.add_argument("--reason", default="", help="why (recorded with your identity)")


def _open(cfg: Config, what: str) -> Any:
    if cfg.cluster is None:
        raise UsageError(f"{what}: no [cluster] section in {cfg.path}: this certd is not part of a fleet")
    from certd.store.opening import open_cluster
    return open_cluster(cfg)


def cmd_status_fleet(args: argparse.Namespace, cfg: Config) -> int:
    with _open(cfg, "status --fleet") as store:
        names = list(args.names) or cfg.names
        unknown = [n for n in names if n not in cfg.names]
        if unknown:
            raise UsageError(f"unknown certificate {', '.join(unknown)}; configured: {cfg.names_summary()}")
        doc = store.fleet.status(names)
        releases = store.releases.status(names)
        assert cfg.cluster is not None
        compromised = store.compromises.status(names, live_window(cfg.cluster.reconcile_interval))
    for cert in doc["certificates"]:
        cert["release"] = releases.get(cert["name"])
        cert["compromised_keys"] = compromised.get(cert["name"], [])
    if args.json:
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
        return EXIT_OK
    rows = []
    for cert in doc["certificates"]:
        for node in cert["nodes"] or [{"node": "-"}]:
            rows.append({"name": cert["name"], "desired": _v(cert["desired_version"]), "node": node["node"],
                         "applied": _v(node.get("applied_version")),
                         "in_sync": "yes" if node.get("applied_version") == cert["desired_version"] else "NO",
                         "release": _release_cell(cert["release"], node["node"]),
                         "verified_at": node.get("verified_at") or "-",
                         "fingerprint": (node.get("fingerprint_sha256") or "-")[:16],
                         "last_error": node.get("last_error") or ""})
    cli_output.print_table(rows, _columns("name", "desired", "node", "applied", "in_sync", "release", "verified_at",
                                          "fingerprint", "last_error"))
    for cert in doc["certificates"]:
        for c in cert["compromised_keys"]:
            print(f"{cert['name']}: compromised key {c['spki_sha256'][:16]}: {_compromise_cell(c)}")
    return EXIT_OK


def _compromise_cell(c: dict[str, Any]) -> str:
    """Where a keyCompromise stands: complete (when, which nodes), or who still holds the key."""
    if c["completed_at"]:
        return f"destroyed everywhere at {c['completed_at']} ({', '.join(c['nodes']) or 'no live node'})"
    held = [*c["holding"], *(["the database"] if c["in_store"] else [])]
    return f"still held by {', '.join(held)}" if held else "destroyed everywhere (completion not recorded yet)"


def _release_cell(release: dict[str, Any] | None, node: str) -> str:
    """``v3:canary``, ``,held`` when held, ``(canary)`` on a canary node's row; ``-`` without one."""
    if release is None:
        return "-"
    text = f"v{release['version']}:{release['state']}" if release.get("state") else "next"
    text += ",held" if release.get("held") else ""
    return text + ("(canary)" if node in release.get("canaries", ()) else "")


def cmd_release(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    """``certd release hold|resume NAME``: the hold row, and an audit record with who asked."""
    from certd.core.events import LifecycleEvent
    from certd.engine.manager import whoami
    cfg = load_config(args)
    cert = cfg.certificate(args.name) if args.name in cfg.names else None
    if cert is None:
        raise UsageError(f"release {args.release_command}: unknown certificate {args.name!r}; "
                         f"configured: {cfg.names_summary()}")
    with _open(cfg, f"release {args.release_command}") as store:
        who = whoami()
        if args.release_command == "hold":
            store.releases.hold(cert.name, who)
        elif not store.releases.resume(cert.name):
            raise UsageError(f"release resume: {cert.name} is not held")
        r = store.releases.get(cert.name)
        assert cfg.cluster is not None
        store.audit(LifecycleEvent(f"release_{'held' if args.release_command == 'hold' else 'resumed'}", cert.name,
                                   SystemClock().now(), initiator=who, reason=args.reason,
                                   version=r.version if r is not None else None,
                                   detail={"node": cfg.cluster.node, "state": r.state.value if r else None}))
    what = f"its release of version {r.version} ({r.state.value})" if r is not None and not r.finished \
        else "its next release"
    if cert.rollout is None:
        print(f"note: {cert.name} has no [certificate.rollout] here: its new versions are not released in steps",
              file=sys.stderr)
    verb = "held: " + what + " stops before promotion" if args.release_command == "hold" \
        else "resumed: " + what + " goes on"
    print(f"{cert.name}: {verb}")
    return EXIT_OK


def _columns(*keys: str) -> list[tuple[str, str]]:
    return [(k.upper(), k) for k in keys]


def _v(version: int | None) -> str:
    return "-" if version is None else str(version)


def cmd_nodes(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]) -> int:
    cfg = load_config(args)
    with _open(cfg, "nodes") as store:
        if args.nodes_command == "remove":
            return _remove(store, cfg, args.node, args.reason)
        nodes = store.fleet.nodes()
    if args.json:
        sys.stdout.write(json.dumps({"nodes": [n.to_json() for n in nodes]}, sort_keys=True) + "\n")
        return EXIT_OK
    rows = [{"node": n.node, "last_seen": n.to_json()["last_seen"], "software": n.software,
             "removed": "yes" if n.removed else "no"} for n in nodes]
    cli_output.print_table(rows, _columns("node", "last_seen", "software", "removed"))
    return EXIT_OK


def _remove(store: Any, cfg: Config, node: str, reason: str) -> int:
    from certd.core.events import LifecycleEvent
    from certd.engine.manager import whoami
    if not store.fleet.remove(node):
        known = ", ".join(n.node for n in store.fleet.nodes()) or "none"
        raise UsageError(f"nodes remove: no node {node!r} in the fleet's database; known: {known}")
    assert cfg.cluster is not None
    store.audit(LifecycleEvent("node_removed", "", SystemClock().now(), initiator=whoami(), reason=reason,
                               detail={"node": cfg.cluster.node, "removed_node": node}))
    print(f"node {node} removed: it no longer counts in `certd status --fleet` (a daemon still running there "
          f"keeps serving; stop it, or it logs that it was removed)")
    return EXIT_OK
