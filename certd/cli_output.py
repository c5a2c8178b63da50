"""What the CLI writes, and what happens when its reader goes away.

``certd status | head -1`` closes the pipe after one line; the next write (or the flush at
exit) then raises BrokenPipeError. Like ``git log | head``, certd then stops writing without a
word: :func:`reader_left` points stdout at /dev/null, so neither the rest of the command nor
the interpreter's final flush complains, and the command keeps its own exit code.
"""

from __future__ import annotations

import os
import select
import sys
from typing import Any

from certd.core.textsafe import escape
from certd.ops.auditchain import MAX_PROBLEMS, Verification

_gone = False


def reader_left() -> None:
    """stdout's reader closed the pipe: send whatever follows to /dev/null, silently."""
    global _gone
    _gone = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to redirect
        pass


def gone() -> bool:
    return _gone


def stdout_closed() -> bool:
    """Is stdout a pipe or socket whose reader went away? (A BrokenPipeError from anything
    else, e.g. a hook's pipe, is a real error, not a reader that left.)"""
    if _gone:
        return True
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def flush() -> None:
    """Flush stdout; a reader that left early is not an error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        reader_left()


def status_domains(domains: Any, wide: bool, limit: int = 3) -> Any:
    """The DOMAINS cell of ``status``: at most ``limit`` names and "(+N more)", all with --wide."""
    if wide or not isinstance(domains, list) or len(domains) <= limit:
        return domains
    return ",".join(map(str, domains[:limit])) + f" (+{len(domains) - limit} more)"


STATUS_COLUMNS = [("NAME", "name"), ("STATE", "state"), ("VER", "version"), ("SERIAL", "serial"),
                  ("NOT AFTER", "not_after"), ("NEXT RENEWAL", "next_renewal"), ("LAST RESULT", "last_result"),
                  ("DOMAINS", "domains")]


def status_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The ``status`` table's columns: with KEY CLASS and KEY AGE (days) before DOMAINS when
    some certificate names a key class (the table is unchanged for everyone else)."""
    if not any(r.get("key_class") for r in rows):
        return STATUS_COLUMNS
    for r in rows:
        age = r.get("key_age_days")
        r["key_age"] = f"{age}d" if isinstance(age, (int, float)) else None
    return STATUS_COLUMNS[:-1] + [("KEY CLASS", "key_class"), ("KEY AGE", "key_age"), STATUS_COLUMNS[-1]]


def history_serials(r: dict[str, Any]) -> str | None:
    """The SERIALS cell of ``history``: old -> new serial; a key's destruction or a pruned
    version also names the key by its SPKI SHA-256 (what proves which key went)."""
    text = " -> ".join(x for x in (r.get("old_serial"), r.get("new_serial")) if x)
    if r.get("event") in ("key_destroyed", "version_pruned", "key_compromise_complete") and r.get("spki_sha256"):
        text = f"{text} spki_sha256:{r['spki_sha256']}".strip()
    return text or None


def cell(v: Any) -> str:
    """One table cell on one line: control characters (newline, ESC, ...) shown escaped, so a
    reason or an error cannot hide, fake or recolour rows on the operator's terminal."""
    if v is None:
        return "-"
    if isinstance(v, list):
        return escape(",".join(map(str, v)))
    return escape(str(v))


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    table = [[h for h, _ in cols]] + [[cell(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def report_verification(v: Verification, where: str) -> int:
    """``certd audit verify``'s report of ``v`` (the chain in ``where``): the exit code."""
    if v.ok:
        head = f" (head: seq {v.last_seq}, hash {v.last_hash})" if v.last_hash else ""
        print(f"{v.records} records, chain intact{head}")
        return 0
    for problem in v.problems[:MAX_PROBLEMS]:
        print(problem)
    if len(v.problems) > MAX_PROBLEMS:
        print(f"... and {len(v.problems) - MAX_PROBLEMS} more problems")
    print(f"audit log TAMPERED or damaged: {len(v.problems)} problem{'s' if len(v.problems) != 1 else ''} "
          f"in {v.records} records ({where})")
    return 1
