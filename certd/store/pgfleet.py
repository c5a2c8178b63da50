"""What a fleet's nodes tell each other through the database, besides the store seam proper:
who is there (``certd_nodes``), what each serves (``certd_node_reports``), and the http-01
answers any node must be able to give (``certd_challenges``). Tables: pgschema's version 2.

None of it is fenced by a certificate's lease: a node writes its own rows (heartbeat, reports),
and a challenge row is written by the node that holds the lease of the order it belongs to.
A removed node (``certd nodes remove``) keeps its rows for the record; they no longer count in
:meth:`FleetBook.status`, and its heartbeat does not bring it back (it must be re-added by name:
a node that was removed on purpose and then starts again says so in its log, see the daemon).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from certd.core.clock import isoformat
from certd.core.errors import StoreUnreachable

#: how long a published http-01 answer is served at most (the order deletes it before)
CHALLENGE_TTL = 3600.0
#: seconds a lookup waits for the one lookup slot (see :meth:`FleetBook.lookup`) before giving up
LOOKUP_WAIT = 1.0
NOW = "COALESCE(%(now)s::timestamptz, clock_timestamp())"
#: a row of certd_nodes that counts as live: not removed, heard from within %(within)s seconds
#: (the database's clock); releases and keyCompromise's completion use the same rule
LIVE = f"NOT removed AND last_seen > {NOW} - make_interval(secs => %(within)s)"
#: a rotation's steps on its way forward (certd.core.rotation): one left there can be adopted
_FORWARD = ["issued", "staged", "switched", "reloaded", "verified"]


class _Db(Protocol):
    node: str

    def now_param(self) -> datetime | None: ...
    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None: ...
    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class NodeRow:
    node: str
    first_seen: datetime
    last_seen: datetime
    software: str
    removed: bool

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "first_seen": isoformat(self.first_seen), "last_seen": isoformat(self.last_seen),
                "software": self.software, "removed": self.removed}


@dataclass(frozen=True)
class NodeView:
    """One certificate as a node's reconcile pass sees it: the desired version, the version
    this node applied, and whether this node's last report says it serves the desired one."""
    desired: int | None
    applied: int | None
    reported: bool


class FleetBook:
    """Nodes, their reports and the shared http-01 answers, on a :class:`~certd.store.pg.PgStore`."""

    def __init__(self, db: _Db) -> None:
        self._db = db
        self._lookup_slot = threading.BoundedSemaphore(1)

    def _args(self, **kw: Any) -> dict[str, Any]:
        return {"now": self._db.now_param(), **kw}

    # -- nodes -------------------------------------------------------------------------------

    def heartbeat(self, node: str, software: str) -> bool:
        """Record that ``node`` is alive and runs ``software``; False when it was removed."""
        row = self._db._one(f"INSERT INTO certd_nodes AS n VALUES (%(node)s, {NOW}, {NOW}, %(sw)s, false) "
                            f"ON CONFLICT (node) DO UPDATE SET last_seen = {NOW}, software = EXCLUDED.software "
                            "RETURNING removed", self._args(node=node, sw=software))
        return not (row and row[0])

    def nodes(self) -> list[NodeRow]:
        return [NodeRow(*r) for r in self._db._all(
            "SELECT node, first_seen, last_seen, software, removed FROM certd_nodes ORDER BY node")]

    def remove(self, node: str) -> bool:
        """Mark ``node`` removed; False when no such node is known."""
        row = self._db._one("UPDATE certd_nodes SET removed = true WHERE node = %s RETURNING node", (node,))
        return row is not None

    def orphaned_orders(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` with a free (released or expired) lease and either a journaled
        order or another node's renewal rotation that had not finished: work a node stopped
        mid-way, for another node to finish (:mod:`certd.engine.adopt`)."""
        rows = self._db._all(
            f"SELECT name FROM (SELECT name FROM certd_orders UNION SELECT name FROM certd_rotations "
            f"WHERE node <> %(node)s AND journal->>'kind' = 'renew' AND journal->>'step' = ANY(%(forward)s)) w "
            f"WHERE name = ANY(%(names)s) AND NOT EXISTS (SELECT 1 FROM certd_leases l WHERE l.name = w.name "
            f"AND l.owner IS NOT NULL AND l.expires > {NOW}) ORDER BY name",
            self._args(names=list(names), node=self._db.node, forward=_FORWARD))
        return [r[0] for r in rows]

    # -- reports -----------------------------------------------------------------------------

    def report(self, node: str, name: str, *, fingerprint: str | None, verified_at: datetime | None,
               error: str | None) -> None:
        """What ``node``'s endpoints serve for ``name`` now (``error``: why it could not apply)."""
        self._db._one(f"INSERT INTO certd_node_reports AS r VALUES (%(node)s, %(name)s, %(fp)s, %(at)s, %(err)s, "
                      f"{NOW}) ON CONFLICT (node, name) DO UPDATE SET "
                      "fingerprint_sha256 = COALESCE(EXCLUDED.fingerprint_sha256, r.fingerprint_sha256), "
                      "verified_at = COALESCE(EXCLUDED.verified_at, r.verified_at), "
                      "last_error = EXCLUDED.last_error, updated = EXCLUDED.updated RETURNING node",
                      self._args(node=node, name=name, fp=fingerprint, at=verified_at, err=error))

    def node_view(self, node: str, names: Sequence[str]) -> dict[str, NodeView]:
        """:class:`NodeView` of each of ``names`` for ``node``, in one query: a reconcile pass
        asked four per certificate (desired, applied, the report, the desired version's
        fingerprint), and with 50 names under a renewal wave the scan alone took 2-7 s before
        the first apply began (the fleet soak's ``fleet_pass scan_s``)."""
        rows = self._db._all(
            "SELECT n.name, d.version, a.version, COALESCE(r.last_error IS NULL "
            "AND r.fingerprint_sha256 = v.info->>'fingerprint_sha256', false) "
            "FROM unnest(%(names)s::text[]) AS n(name) "
            "LEFT JOIN certd_desired d ON d.name = n.name "
            "LEFT JOIN certd_applied a ON a.node = %(node)s AND a.name = n.name "
            "LEFT JOIN certd_node_reports r ON r.node = %(node)s AND r.name = n.name "
            "LEFT JOIN certd_versions v ON v.name = n.name AND v.version = d.version",
            {"names": list(names), "node": node})
        return {r[0]: NodeView(r[1], r[2], bool(r[3])) for r in rows}

    def reported_fingerprint(self, node: str, name: str) -> str | None:
        """The fingerprint ``node`` last reported serving for ``name`` (None: none, or an error)."""
        row = self._db._one("SELECT fingerprint_sha256, last_error FROM certd_node_reports "
                            "WHERE node = %s AND name = %s", (node, name))
        return row[0] if row and row[1] is None else None

    def status(self, names: Sequence[str]) -> dict[str, Any]:
        """``certd status --fleet --json``: per certificate the desired version, per live
        (not removed) node what it applied and serves (docs/CONTRACT: fleet status)."""
        desired = dict(self._db._all("SELECT name, version FROM certd_desired"))
        nodes = [n.node for n in self.nodes() if not n.removed]
        applied = {(n, c): v for n, c, v in self._db._all("SELECT node, name, version FROM certd_applied")}
        reports = {(r[0], r[1]): r[2:] for r in self._db._all(
            "SELECT node, name, fingerprint_sha256, verified_at, last_error FROM certd_node_reports")}
        out = []
        for name in names:
            rows = []
            for node in nodes:
                fp, at, err = reports.get((node, name), (None, None, None))
                rows.append({"node": node, "applied_version": applied.get((node, name)), "fingerprint_sha256": fp,
                             "verified_at": isoformat(at) if at else None, "last_error": err})
            out.append({"name": name, "desired_version": desired.get(name), "release": None, "nodes": rows})
        return {"certificates": out}

    # -- http-01 answers ---------------------------------------------------------------------

    def publish(self, token: str, key_authorization: str, name: str) -> None:
        self._db._one(f"INSERT INTO certd_challenges VALUES (%(t)s, %(k)s, %(n)s, {NOW} + make_interval(secs => "
                      "%(ttl)s)) ON CONFLICT (token) DO UPDATE SET key_authorization = EXCLUDED.key_authorization, "
                      "expires = EXCLUDED.expires RETURNING token",
                      self._args(t=token, k=key_authorization, n=name, ttl=CHALLENGE_TTL))

    def lookup(self, token: str) -> str | None:
        """The answer published for ``token``, or None. One lookup at a time per store: the
        http-01 responder calls this for requests anyone can send, and a flood of them must never
        hold more than one of the pooled connections renewals need. StoreUnreachable when the
        slot stays busy for :data:`LOOKUP_WAIT` seconds (the request is answered 404)."""
        if not self._lookup_slot.acquire(timeout=LOOKUP_WAIT):
            raise StoreUnreachable(f"http-01 answer lookups busy for {LOOKUP_WAIT:g} s (one at a time)")
        try:
            return self._lookup(token)
        finally:
            self._lookup_slot.release()

    def _lookup(self, token: str) -> str | None:
        row = self._db._one(f"SELECT key_authorization FROM certd_challenges WHERE token = %(t)s AND expires > {NOW}",
                            self._args(t=token))
        return row[0] if row else None

    def withdraw(self, token: str) -> None:
        self._db._one(f"DELETE FROM certd_challenges WHERE token = %(t)s OR expires <= {NOW} RETURNING token",
                      self._args(t=token))

