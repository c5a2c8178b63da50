"""keyCompromise across a fleet, on PostgreSQL (:mod:`certd.engine.compromise`): which node
destroyed its own copies of which compromised key, who still holds one, and the fleet-wide
completion. Tables: pgschema's version 6.

A compromised key is named by its certificate's SPKI SHA-256 (``certd_versions.info``), never by
its bytes: the node that re-keyed destroys the store's sealed copy at once, and the other nodes
still have to find their deployed copies afterwards. The set of compromised keys is read from
the versions marked ``key_compromised`` (:mod:`certd.engine.lifecycle`), so ``prune`` spares
such a version until its key's completion is recorded (:data:`UNFINISHED`; a version pruned
earlier dropped out of the set, and nodes still holding the key never destroyed it: review).

**Who holds a key** (:meth:`CompromiseBook.holding`): every node not removed (``certd nodes
remove``) that ever applied the certificate (a row in ``certd_applied``: a node without the
certificate in its configuration has no copy) and has not recorded destroying the key
(``certd_key_destructions``), **whether or not it heartbeats now**: a node cut off from the
database, rebooting or stuck in a long pass still serves and stores the key, and "complete"
must not be said over it (it was, for nodes outside the live window: review). It finishes by
itself when it is back, or an operator removes it. A node records destroying only after it
serves a version with another key, so "destroyed" also says "moved off".

**Completion** (:meth:`CompromiseBook.complete`): when no node holds the key and no stored
version keeps a sealed copy of it, a row in ``certd_key_compromise_done`` is claimed with
``INSERT ... ON CONFLICT DO NOTHING`` and, in the same transaction, the ``key_compromise_complete``
audit record is chained with a spool id naming the key: whichever node's pass (or waiting
``certd revoke``) gets there first writes both, any other writes neither, and a crash between
them cannot happen. None of it is fenced by the certificate's lease: a node writes its own
destruction rows, and the completion is decided from rows, not from who asks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from certd.core.events import LifecycleEvent
from certd.store.pgfeed import append_in
from certd.store.pgfleet import NOW
from certd.store.port import Compromise

_SPKI = "v.info ->> 'spki_sha256'"
_COMPROMISED = "(v.meta ->> 'key_compromised')::boolean IS TRUE"
#: versions (``v``) whose compromised key the fleet has not finished destroying: the store keeps
#: them (prune spares them), since the set of keys to destroy is read from their rows
UNFINISHED = (f"{_COMPROMISED} AND NOT EXISTS (SELECT 1 FROM certd_key_compromise_done c "
              f"WHERE c.name = v.name AND c.spki_sha256 = {_SPKI})")


class _Db(Protocol):
    node: str

    def now_param(self) -> datetime | None: ...
    def tx(self) -> Any: ...
    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None: ...
    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]: ...


class CompromiseBook:
    """Per-node destruction records and the fleet-wide completion of compromised keys."""

    def __init__(self, db: _Db) -> None:
        self._db = db

    @property
    def node(self) -> str:
        """The node this book writes destruction rows for (the store's)."""
        return self._db.node

    def _args(self, **kw: Any) -> dict[str, Any]:
        return {"now": self._db.now_param(), **kw}

    def pending(self, names: Sequence[str]) -> dict[str, set[str]]:
        """Per certificate of ``names``, the SPKI hashes of its compromised keys that this node has
        not recorded destroying (usually empty: one query per reconcile pass)."""
        out: dict[str, set[str]] = {}
        for name, spki in self._db._all(
                f"SELECT DISTINCT v.name, {_SPKI} FROM certd_versions v WHERE v.name = ANY(%(names)s) "
                f"AND {_COMPROMISED} AND NOT EXISTS (SELECT 1 FROM certd_key_destructions d WHERE d.name = v.name "
                f"AND d.spki_sha256 = {_SPKI} AND d.node = %(node)s)",
                self._args(names=list(names), node=self._db.node)):
            out.setdefault(name, set()).add(spki)
        return out

    def destroyed(self, name: str, spki: str, files: int) -> None:
        """Record that this node destroyed its copies of ``spki``'s key (``files`` removed), and wake
        the other nodes' passes (one of them may now see the completion)."""
        self._db._one(f"INSERT INTO certd_key_destructions AS d VALUES (%(name)s, %(spki)s, %(node)s, {NOW}, "
                      "%(files)s) ON CONFLICT (name, spki_sha256, node) DO UPDATE SET at = EXCLUDED.at, "
                      "files = d.files + EXCLUDED.files RETURNING node",
                      self._args(name=name, spki=spki, node=self._db.node, files=files))
        self._db._one("SELECT pg_notify('certd_desired', %s)", (name,))

    def unfinished(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """(name, SPKI) of every compromised key of ``names`` whose completion is not recorded yet."""
        return [(r[0], r[1]) for r in self._db._all(
            f"SELECT DISTINCT v.name, {_SPKI} FROM certd_versions v WHERE v.name = ANY(%(names)s) AND {_COMPROMISED} "
            f"AND NOT EXISTS (SELECT 1 FROM certd_key_compromise_done c WHERE c.name = v.name "
            f"AND c.spki_sha256 = {_SPKI}) ORDER BY 1, 2", self._args(names=list(names)))]

    def look(self, name: str, spki: str, within: float, cur: psycopg.Cursor[Any] | None = None) -> Compromise:
        """Where ``spki``'s key of ``name`` stands now (``within``: the live window, seconds)."""
        args = self._args(name=name, spki=spki, within=within)

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return list(cur.execute(sql, args).fetchall()) if cur is not None else self._db._all(sql, args)

        live = ("SELECT n.node FROM certd_nodes n WHERE NOT n.removed AND EXISTS (SELECT 1 FROM certd_applied a "
                "WHERE a.node = n.node AND a.name = %(name)s)")  # live or not: see the module's docstring
        mine = ("EXISTS (SELECT 1 FROM certd_key_destructions d WHERE d.node = n.node AND d.name = %(name)s "
                "AND d.spki_sha256 = %(spki)s) ORDER BY 1")
        holding = [r[0] for r in rows(f"{live} AND NOT {mine}")]
        destroyed = [r[0] for r in rows(f"{live} AND {mine}")]
        in_store = bool(rows(f"SELECT 1 FROM certd_versions v WHERE v.name = %(name)s AND {_SPKI} = %(spki)s "
                             "AND length(v.key) > 0 LIMIT 1"))
        done = rows("SELECT at, nodes FROM certd_key_compromise_done WHERE name = %(name)s AND spki_sha256 = %(spki)s")
        if done:
            return Compromise(name, spki, tuple(holding), in_store, done[0][0], tuple(done[0][1]))
        return Compromise(name, spki, tuple(holding), in_store, None, tuple(destroyed))

    def complete(self, name: str, spki: str, within: float,
                 event: Callable[[Compromise], LifecycleEvent]) -> tuple[Compromise, bool]:
        """Record the completion if the key is gone everywhere (see the module's docstring), with
        ``event(compromise)``'s audit record in the same transaction. Returns where it stands and
        whether this call recorded the completion (True for exactly one caller)."""
        with self._db.tx() as cur:
            c = self.look(name, spki, within, cur)
            if c.completed_at is not None or c.holding or c.in_store:
                return c, False
            row = cur.execute(f"INSERT INTO certd_key_compromise_done VALUES (%(name)s, %(spki)s, {NOW}, %(node)s, "
                              "%(nodes)s) ON CONFLICT DO NOTHING RETURNING at",
                              self._args(name=name, spki=spki, node=self._db.node, nodes=Jsonb(list(c.nodes))))
            if row.fetchone() is None:
                return self.look(name, spki, within, cur), False
            append_in(cur, event(c), f"key_compromise_complete:{name}:{spki}")
        done = self.look(name, spki, within)
        return done, True

    def status(self, names: Sequence[str], within: float) -> dict[str, list[dict[str, Any]]]:
        """``status --fleet``'s ``compromised_keys`` of each of ``names``: every compromised key
        not completed, and completed ones with their time (few: one per keyCompromise)."""
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for name, spki in self._db._all(
                f"SELECT DISTINCT v.name, {_SPKI} FROM certd_versions v WHERE v.name = ANY(%(names)s) "
                f"AND {_COMPROMISED} ORDER BY 1, 2", self._args(names=list(names))):
            out[name].append(self.look(name, spki, within).to_json())
        return out
