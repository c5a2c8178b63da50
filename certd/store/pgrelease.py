"""Fleet releases on PostgreSQL (:mod:`certd.core.release`): the release of each certificate,
the nodes' reports on its version, operator holds, the versions marked bad, and which nodes
can verify which certificate (hollow canaries). Tables: pgschema's versions 4 and 5.

Writes that move the desired version or mark a version bad (:meth:`ReleaseBook.open`,
:meth:`ReleaseBook.record`, :meth:`ReleaseBook.roll_back`) are fenced by the certificate's lease,
in one transaction with the release row: a node that lost the lease cannot promote, abort or roll
back. A node's report, what it verifies and an operator's hold are that node's / that operator's
own rows, not fenced.

S3 is kept here, whoever asks: :meth:`desired_refusal` (called by ``PgStore.set_desired`` in
its transaction) refuses to make desired a version marked bad, or a release's version before
its canaries promoted it; a node asks ``certd.engine.releases.deploy_refusal`` (which reads the
same mark) before it deploys anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from certd.core.errors import StoreError
from certd.core.release import BAD, TERMINAL, Effect, Release, Report, State
from certd.store.pgfleet import LIVE
from certd.store.port import Lease

NOW = "COALESCE(%(now)s::timestamptz, clock_timestamp())"


class _Db(Protocol):
    node: str

    def now_param(self) -> Any: ...
    def set_applied(self, node: str, name: str, version: int | None) -> None: ...
    def _set_desired(self, cur: psycopg.Cursor[Any], name: str, version: int) -> None: ...
    def tx(self) -> Any: ...
    def _fence(self, cur: psycopg.Cursor[Any], name: str, lease: Lease | None) -> None: ...
    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None: ...
    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]: ...


def desired_refusal(cur: psycopg.Cursor[Any], name: str, version: int) -> str | None:
    """Why ``version`` must not become ``name``'s desired version (S3), or None."""
    row = cur.execute("SELECT meta -> %s ->> 'reason' FROM certd_versions WHERE name = %s AND version = %s",
                      (BAD, name, version)).fetchone()
    if row is not None and row[0] is not None:
        return f"{name}: version {version} is marked bad ({row[0]}); it is never deployed again"
    row = cur.execute("SELECT body ->> 'state' FROM certd_releases WHERE name = %s AND (body ->> 'version')::int = %s",
                      (name, version)).fetchone()
    if row is not None and row[0] in (State.ISSUED.value, State.CANARY.value):
        return f"{name}: version {version} is in a release at its {row[0]} step; only its promotion moves it"
    return None


class ReleaseBook:
    """Releases, reports, holds and bad versions, on a :class:`~certd.store.pg.PgStore`."""

    def __init__(self, db: _Db) -> None:
        self._db = db

    def get(self, name: str) -> Release | None:
        row = self._db._one("SELECT body FROM certd_releases WHERE name = %s", (name,))
        return Release.from_json(row[0]) if row else None

    def open(self, release: Release, *, lease: Lease | None = None) -> None:
        """Record a new release of ``release.name`` (fenced); StoreError while another is unfinished."""
        with self._db.tx() as cur:
            self._db._fence(cur, release.name, lease)
            row = cur.execute("SELECT body FROM certd_releases WHERE name = %s FOR UPDATE", (release.name,)).fetchone()
            if row is not None and not Release.from_json(row[0]).finished:
                raise StoreError(f"{release.name}: release of version {row[0]['version']} is still "
                                 f"{row[0]['state']}; a new one waits for it")
            self._save(cur, release)
            cur.execute("SELECT pg_notify('certd_desired', %s)", (release.name,))  # a driver picks canaries now

    def record(self, release: Release, effect: Effect, *, lease: Lease | None = None) -> None:
        """Record a transition and do its ``effect``, in one fenced transaction."""
        name = release.name
        with self._db.tx() as cur:
            self._db._fence(cur, name, lease)
            self._save(cur, release)
            target = {Effect.PROMOTE: release.version, Effect.ROLL_BACK: release.previous}.get(effect)
            if target is not None:
                cur.execute("INSERT INTO certd_desired VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                            "SET version = EXCLUDED.version", (name, target))
            if effect in (Effect.ABORT, Effect.ROLL_BACK):
                self._mark_bad(cur, name, release.version, release.state.value, release.reason)
            # every step wakes every node at commit: new canaries deploy, the fleet follows a
            # promotion, canaries go back after an abort — not at their next reconcile pass
            cur.execute("SELECT pg_notify('certd_desired', %s)", (name,))

    def roll_back(self, name: str, left: int, to: int, reason: str, now: datetime, *,
                  lease: Lease | None = None) -> None:
        """An operator's fleet rollback from ``left`` to ``to``, in one fenced transaction:
        desired moves to ``to`` (S3's checks, as :meth:`PgStore.set_desired`), ``left`` is
        marked bad and a release of ``left`` in flight ends (``fleet_rolled_back``). Separate
        writes left a window — desired moved, ``left`` not yet bad — after which a release could
        promote ``left`` again. Then this node's applied version is ``to`` (the rotation
        deployed and verified it here)."""
        with self._db.tx() as cur:
            self._db._fence(cur, name, lease)
            self._db._set_desired(cur, name, to)
            self._mark_bad(cur, name, left, "operator_rollback", reason)
            row = cur.execute("SELECT body FROM certd_releases WHERE name = %s FOR UPDATE", (name,)).fetchone()
            r = Release.from_json(row[0]) if row is not None else None
            if r is not None and not r.finished and r.version == left:
                self._save(cur, replace(r, state=State.FLEET_ROLLED_BACK, since=now, reason=reason))
        self._db.set_applied(self._db.node, name, to)

    @staticmethod
    def _mark_bad(cur: psycopg.Cursor[Any], name: str, version: int, state: str, reason: str) -> None:
        cur.execute("UPDATE certd_versions SET meta = meta || %s WHERE name = %s AND version = %s",
                    (Jsonb({BAD: {"state": state, "reason": reason}}), name, version))

    @staticmethod
    def _save(cur: psycopg.Cursor[Any], release: Release) -> None:
        cur.execute("INSERT INTO certd_releases VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                    (release.name, Jsonb(release.to_json())))

    def marks(self, names: Sequence[str]) -> dict[str, str]:
        """Each of ``names`` with an unfinished release -> a digest of what the writes that
        notify change about it: the release, the reports on its version, its hold, the desired
        version, the version's meta (marked bad, revoked). One query for a whole pass: a driver
        drives again only the releases whose digest moved (certd/daemon/releasing.py); what
        changes unnotified — the clock (``fleet_timeout``), which nodes are live — it sweeps."""
        version = "(r.body ->> 'version')::int"
        return dict(self._db._all(
            "SELECT r.name, md5(concat_ws('|', r.body::text, "  # each part COALESCEd: a missing one keeps its place
            "COALESCE((SELECT string_agg(concat_ws(':', p.node, p.ok, p.at), ',' ORDER BY p.node) "
            f"  FROM certd_release_reports p WHERE p.name = r.name AND p.version = {version}), ''), "
            "COALESCE((SELECT h.at::text FROM certd_release_holds h WHERE h.name = r.name), ''), "
            "COALESCE((SELECT d.version::text FROM certd_desired d WHERE d.name = r.name), ''), "
            f"COALESCE((SELECT v.meta::text FROM certd_versions v WHERE v.name = r.name AND v.version = {version}), "
            "''))) "
            "FROM certd_releases r WHERE r.name = ANY(%s) AND NOT (r.body ->> 'state' = ANY(%s))",
            (list(names), sorted(s.value for s in TERMINAL))))

    def bad(self, name: str, version: int) -> str | None:
        """Why ``version`` of ``name`` must never be deployed (marked bad), or None."""
        row = self._db._one("SELECT meta -> %s ->> 'reason' FROM certd_versions WHERE name = %s AND version = %s",
                            (BAD, name, version))
        return f"version {version} is marked bad: {row[0]}" if row and row[0] is not None else None

    # -- reports, holds, live nodes ----------------------------------------------------------

    def report(self, name: str, version: int, node: str, ok: bool, error: str | None) -> None:
        self._db._one(f"INSERT INTO certd_release_reports VALUES (%(name)s, %(v)s, %(node)s, %(ok)s, %(err)s, {NOW}) "
                      "ON CONFLICT (name, version, node) DO UPDATE SET ok = EXCLUDED.ok, error = EXCLUDED.error, "
                      "at = EXCLUDED.at RETURNING node",
                      {"name": name, "v": version, "node": node, "ok": ok, "err": error, "now": self._db.now_param()})
        self._db._one("SELECT pg_notify('certd_desired', %s)", (name,))  # the driver looks at once

    def reports(self, name: str, version: int) -> dict[str, Report]:
        return {r[0]: Report(r[1], r[2]) for r in self._db._all(
            "SELECT node, ok, error FROM certd_release_reports WHERE name = %s AND version = %s", (name, version))}

    def hold(self, name: str, initiator: str) -> None:
        self._db._one(f"INSERT INTO certd_release_holds VALUES (%(name)s, %(who)s, {NOW}) ON CONFLICT (name) "
                      "DO UPDATE SET initiator = EXCLUDED.initiator, at = EXCLUDED.at RETURNING name",
                      {"name": name, "who": initiator, "now": self._db.now_param()})

    def resume(self, name: str) -> bool:
        """Lift the hold on ``name``; False when it was not held."""
        row = self._db._one("DELETE FROM certd_release_holds WHERE name = %s RETURNING name", (name,))
        if row is not None:
            self._db._one("SELECT pg_notify('certd_desired', %s)", (name,))  # the driver looks at once
        return row is not None

    def held(self, name: str) -> bool:
        return self._db._one("SELECT 1 FROM certd_release_holds WHERE name = %s", (name,)) is not None

    def publish_verifies(self, node: str, verifies: Mapping[str, bool]) -> None:
        """Say which certificates ``node`` releases (the keys: it has them with a rollout table)
        and whether its configuration verifies each by handshake; forget the others."""
        with self._db.tx() as cur:
            cur.execute("DELETE FROM certd_node_verifies WHERE node = %s AND NOT (name = ANY(%s))",
                        (node, sorted(verifies)))
            for name, yes in sorted(verifies.items()):
                cur.execute("INSERT INTO certd_node_verifies VALUES (%s, %s, %s) ON CONFLICT (node, name) "
                            "DO UPDATE SET verifies = EXCLUDED.verifies", (node, name, yes))

    def members(self, name: str) -> frozenset[str]:
        """The nodes that said they release ``name`` (see :meth:`publish_verifies`)."""
        return frozenset(r[0] for r in self._db._all("SELECT node FROM certd_node_verifies WHERE name = %s", (name,)))

    def hollow(self, name: str) -> frozenset[str]:
        """The nodes that said they have no verify endpoints for ``name``."""
        return frozenset(r[0] for r in self._db._all(
            "SELECT node FROM certd_node_verifies WHERE name = %s AND NOT verifies", (name,)))

    def live_nodes(self, within: float) -> list[str]:
        """Nodes not removed that heartbeat within the last ``within`` seconds (the database's clock)."""
        return [r[0] for r in self._db._all(f"SELECT node FROM certd_nodes WHERE {LIVE} ORDER BY node",
                                            {"within": within, "now": self._db.now_param()})]

    def status(self, names: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """``status --fleet``'s ``release`` of each of ``names``: the latest release and its hold."""
        bodies = dict(self._db._all("SELECT name, body FROM certd_releases WHERE name = ANY(%s)", (list(names),)))
        holds = dict(self._db._all("SELECT name, initiator FROM certd_release_holds WHERE name = ANY(%s)",
                                   (list(names),)))
        out: dict[str, dict[str, Any] | None] = {}
        for name in names:
            body = bodies.get(name)
            if body is None and name not in holds:
                out[name] = None
                continue
            row = {**(body or {"state": None, "version": None, "canaries": []}),
                   "held": name in holds, "held_by": holds.get(name)}
            row.pop("name", None)
            out[name] = row
        return out
