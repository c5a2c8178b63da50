"""``certd cluster import``: move a single host's state directory into the fleet's database.

What moves (read from the :class:`~certd.store.files.FileStore`, written into the
:class:`~certd.store.pg.PgStore`): every certificate's versions with their original numbers
(certificate, chain, metadata; the key opened with the state directory's ``[keys]`` ring, or
read plain, and sealed again for the database's slot ``version/<name>/<n>``), the desired
version, the state (failure count, hold, ARI cache), an order in flight (its key sealed as
``order/<name>``), the ACME accounts (so the next renewal's ARI ``replaces`` names the same
account's certificate), and the audit chain. This node's applied version becomes the desired
one: it already serves it.

Decisions
---------
- **Nothing is written to the state directory** (no lock file, no lease): a running daemon is
  refused by the CLI instead, and a rotation journal left by a crash is refused (finish it with
  one ``certd run`` first), so nothing is read half done.
- **One transaction per certificate**, under the certificate's lease: it is in the database
  whole or not at all. Every imported version's metadata says where it came from
  (``imported_from``: node and state directory), so a rerun after an interruption recognises
  what it already moved and goes on with the rest (idempotent).
- **A certificate the database already holds from elsewhere is refused**, all in one line,
  before anything is written; ``--skip-existing`` leaves those as the database has them (the
  fleet's version wins; this node converges to it) and imports the rest.
- **The audit chain**: into a database whose audit log is still empty, the file's lines are
  copied as they are (same ``seq``, ``prev``, ``hash``), so the database's chain *is* the
  host's chain continued and ``certd audit verify`` checks both in one walk. Into a database
  that already has a chain (a fleet running, a second host imported), records cannot be
  spliced in; the ``imported`` record then pins the file's head (records, last seq, last hash)
  and ``certd audit verify`` checks the file on this host against that pin. A damaged file log
  is refused (``certd audit verify`` on the single-host config names the problem).
- Accounts the database already has for the same ACME directory are kept (the fleet's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from certd.core.errors import LockBusy, StoreError, UsageError
from certd.core.events import LifecycleEvent
from certd.core.rotation import TERMINAL
from certd.crypto.custody import KeyRing
from certd.ops.audit import AuditLog
from certd.ops.auditchain import line_hash
from certd.store import fileio
from certd.store.files import FileStore
from certd.store.pg import PgStore
from certd.store.port import OrderJournal, StoredVersion

#: A rotation journal at one of these steps is finished (kept for status); any other is in flight.
FINISHED = frozenset(step.value for step in TERMINAL)
IMPORT_TTL = 600.0  # the certificate's lease while it is written (one transaction: seconds)


@dataclass(frozen=True)
class SourceCert:
    """One certificate as the state directory holds it."""

    name: str
    versions: list[StoredVersion]
    desired: int | None
    state: dict[str, Any] | None
    order: OrderJournal | None
    journal: dict[str, Any] | None  # this node's last rotation, finished (status shows it)


@dataclass
class Report:
    """What an import moved (``moved``), found already moved by an earlier run (``resumed``),
    and left alone because the database had it (``skipped``)."""

    source: str
    moved: list[SourceCert] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    accounts: int = 0
    accounts_kept: int = 0
    audit: str = "none"      # copied | already | pinned | none
    audit_records: int = 0


def source_id(node: str, state_dir: Path) -> str:
    """What ``imported_from`` says: which node's state directory a version came from."""
    return f"{node}:{state_dir}"


# --- reading the state directory (no writes) ---------------------------------------------------


def read_certs(source: FileStore) -> list[SourceCert]:
    """Every certificate in ``source``; :class:`UsageError` for one in the middle of a rotation."""
    certs = []
    for name in source.names():
        journal = source.load_journal(name)
        if journal is not None and journal.get("step") not in FINISHED:
            raise UsageError(f"cluster import: {name} has a rotation in progress in {source.root} (left by a crash); "
                             f"run `certd run` once on the single-host config to finish it, stop it, then import; "
                             f"nothing was imported")
        versions = [source.load(name, v) for v in source.versions(name)]
        cert = SourceCert(name, versions, source.desired(name), source.read_state(name)[0], source.load_order(name),
                          journal)
        if versions or cert.state is not None or cert.order is not None:  # not a directory left empty
            certs.append(cert)
    return certs


def read_accounts(source: FileStore) -> list[tuple[str, bytes, str]]:
    """(directory URL, key PEM, registration JSON) of every completed registration."""
    base = source.root / "accounts"
    try:
        entries = sorted(e for e in os.listdir(base) if (base / e).is_dir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        try:
            url = fileio.read(f"{base}/{entry}/directory.txt").decode("utf-8").strip()
        except FileNotFoundError:
            continue  # a registration that never completed
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"{base}/{entry}/directory.txt: unreadable ({e})") from None
        account = source.load_account(url)
        if account is not None:
            found.append((url, account[0], account[1]))
    return found


# --- the import --------------------------------------------------------------------------------


class Importer:
    """Moves ``source`` into ``target`` as node ``node``; keys sealed with ``ring`` (the same
    ``[keys]`` the target uses)."""

    def __init__(self, source: FileStore, target: PgStore, ring: KeyRing, *, node: str, initiator: str,
                 now: datetime) -> None:
        self.source, self.target, self.ring = source, target, ring
        self.node, self.initiator, self.now = node, initiator, now
        self.origin = source_id(node, source.root)

    def run(self, *, skip_existing: bool = False) -> Report:
        certs = read_certs(self.source)
        accounts = read_accounts(self.source)
        log = self.source.audit
        lines = self._audit_lines(log)
        report = Report(self.origin)
        foreign, ours = self._existing([c.name for c in certs])
        for cert in certs:  # no version to carry a mark: the state alone, as this import wrote it
            if cert.name in foreign and not cert.versions and not self.target.versions(cert.name) \
                    and self.target.read_state(cert.name)[0] == cert.state:
                foreign.discard(cert.name)
                ours.add(cert.name)
        if foreign and not skip_existing:
            raise UsageError(f"cluster import: the fleet database already holds {', '.join(sorted(foreign))} (not "
                             f"from this state dir); nothing was imported; --skip-existing keeps the database's "
                             f"and imports the rest")
        report.audit, report.audit_records = self._audit(lines)
        for url, key_pem, registration in accounts:
            if self.target.load_account(url) is None:
                self.target.save_account(url, key_pem, registration)
                report.accounts += 1
            else:
                report.accounts_kept += 1
        for cert in certs:
            if cert.name in ours:
                report.resumed.append(cert.name)
            elif cert.name in foreign:
                report.skipped.append(cert.name)
            elif self._write_cert(cert):
                report.moved.append(cert)
                self._emit(LifecycleEvent("imported", cert.name, self.now, initiator=self.initiator,
                                          reason=f"cluster import from {self.origin}", version=cert.desired,
                                          detail={"source": self.origin, "node": self.node,
                                                  "versions": [v.version for v in cert.versions]}))
            else:
                report.resumed.append(cert.name)
        if report.moved or report.accounts or report.audit == "copied":
            self._emit(LifecycleEvent("imported", "", self.now, initiator=self.initiator,
                                      reason=f"cluster import of {self.source.root} as node {self.node}",
                                      detail=self._summary(report, log, lines)))
        return report

    def _audit_lines(self, log: AuditLog) -> list[bytes]:
        v = log.verify()
        if not v.ok:
            raise UsageError(f"cluster import: {log.path} is damaged ({v.problems[0]}); `certd audit verify` on the "
                             f"single-host config lists the problems; move the log aside to import without it; "
                             f"nothing was imported")
        return log.lines()

    def _existing(self, names: list[str]) -> tuple[set[str], set[str]]:
        """The names the database holds already: (from elsewhere, from this very import). A
        name is this import's when any of its versions came from this state dir (the fleet may
        have renewed it since)."""
        with self.target.tx() as cur:
            rows = cur.execute(
                "SELECT n.name, COALESCE(bool_or(v.meta->>'imported_from' = %s), false) "
                "FROM unnest(%s::text[]) AS n(name) LEFT JOIN certd_versions v ON v.name = n.name "
                "WHERE EXISTS (SELECT 1 FROM certd_versions x WHERE x.name = n.name) "
                "OR EXISTS (SELECT 1 FROM certd_desired d WHERE d.name = n.name) "
                "OR EXISTS (SELECT 1 FROM certd_state s WHERE s.name = n.name) GROUP BY n.name",
                (self.origin, names)).fetchall()
        return {n for n, mine in rows if not mine}, {n for n, mine in rows if mine}

    def _audit(self, lines: list[bytes]) -> tuple[str, int]:
        """Copy the file's chain into an empty database chain (see the module essay)."""
        if not lines:
            return "none", 0
        with self.target.tx() as cur:
            head = cur.execute("SELECT seq, prev FROM certd_audit_head WHERE id = 1 FOR UPDATE").fetchone()
            if head is None:
                raise StoreError("certd_audit_head has no row: the audit table was tampered with")
            if head[0] == 0:
                for line in lines:
                    rec = json.loads(line)
                    cur.execute("INSERT INTO certd_audit VALUES (%s, %s)", (int(rec["seq"]), line.decode("ascii")))
                last = json.loads(lines[-1])
                cur.execute("UPDATE certd_audit_head SET seq = %s, prev = %s WHERE id = 1",
                            (int(last["seq"]), line_hash(lines[-1])))
                return "copied", len(lines)
            first = [r[0] for r in cur.execute("SELECT line FROM certd_audit ORDER BY seq LIMIT %s", (len(lines),))]
        if first == [line.decode("ascii") for line in lines]:
            return "already", len(lines)
        return "pinned", len(lines)

    def _write_cert(self, cert: SourceCert) -> bool:
        """The certificate in one transaction under its lease; False when an earlier run did it."""
        try:
            lease = self.target.lease(cert.name, f"{self.node}:cluster-import", IMPORT_TTL)
        except LockBusy:
            raise UsageError(f"cluster import: a fleet node holds the lease of {cert.name} (it is renewing it); "
                             f"try again in a minute; what was imported so far stays") from None
        try:
            with self.target.tx() as cur:
                row = cur.execute("SELECT token FROM certd_leases WHERE name = %s FOR SHARE", (cert.name,)).fetchone()
                if row is None or row[0] != lease.token:
                    raise StoreError(f"{cert.name}: the lease was taken over during the import; run it again")
                if cur.execute("SELECT 1 FROM certd_versions WHERE name = %s LIMIT 1", (cert.name,)).fetchone():
                    return False
                for sv in cert.versions:
                    self._insert_version(cur, sv)
                self._insert_rest(cur, cert)
            return True
        finally:
            self.target.release(lease)

    def _insert_version(self, cur: Any, sv: StoredVersion) -> None:
        key = self.ring.seal(sv.bundle.key_pem, f"version/{sv.name}/{sv.version}") if sv.bundle.key_pem else b""
        cur.execute("INSERT INTO certd_versions (name, version, cert, chain, key, info, meta) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (sv.name, sv.version, sv.bundle.cert_pem, sv.bundle.chain_pem, key,
                     Jsonb(sv.bundle.info.to_json()), Jsonb({**sv.meta, "imported_from": self.origin})))

    def _insert_rest(self, cur: Any, cert: SourceCert) -> None:
        name = cert.name
        if cert.desired is not None:
            cur.execute("INSERT INTO certd_desired VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                        "SET version = EXCLUDED.version", (name, cert.desired))
            cur.execute("INSERT INTO certd_applied VALUES (%s, %s, %s) ON CONFLICT (node, name) DO UPDATE "
                        "SET version = EXCLUDED.version", (self.node, name, cert.desired))
        if cert.state is not None:
            cur.execute("INSERT INTO certd_state VALUES (%s, %s, 1) ON CONFLICT (name) DO UPDATE "
                        "SET body = EXCLUDED.body, etag = certd_state.etag + 1", (name, Jsonb(cert.state)))
        if cert.order is not None:
            o = cert.order
            cur.execute("INSERT INTO certd_orders VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                        (name, o.order_url, self.ring.seal(o.key_pem, f"order/{name}"), o.created, Jsonb(o.meta)))
        if cert.journal is not None:
            cur.execute("INSERT INTO certd_rotations VALUES (%s, %s, %s) ON CONFLICT (node, name) DO NOTHING",
                        (self.node, name, Jsonb(cert.journal)))
        cur.execute("INSERT INTO certd_changes VALUES (%s, 1) ON CONFLICT (name) DO UPDATE "
                    "SET changed = certd_changes.changed + 1", (name,))
        cur.execute("SELECT pg_notify('certd_desired', %s)", (name,))

    def _summary(self, report: Report, log: AuditLog, lines: list[bytes]) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "source": self.origin, "node": self.node, "certificates": [c.name for c in report.moved],
            "versions": sum(len(c.versions) for c in report.moved), "accounts": report.accounts,
            "skipped": report.skipped, "audit": report.audit}
        if lines:
            last = json.loads(lines[-1])
            detail["source_audit"] = {"file": str(log.path), "records": len(lines), "last_seq": int(last["seq"]),
                                      "last_hash": str(last["hash"]), "last_line_sha256": line_hash(lines[-1])}
        return detail

    def _emit(self, ev: LifecycleEvent) -> None:
        self.target.audit.append(ev)

