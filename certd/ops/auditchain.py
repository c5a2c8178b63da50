"""The audit log's hash chain: the canonical form of a record, its hash, and the check of a
whole log against its head (see :mod:`certd.ops.audit` for what the two hashes prove).
Pure over bytes: :meth:`certd.ops.audit.AuditLog.verify` reads the files and calls
:func:`verify_lines`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


GENESIS = "0" * 64
FILENAME = "audit.jsonl"
HEAD_FILENAME = "audit.head"
MAX_PROBLEMS = 50


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes ``hash`` covers: the record without ``hash``, sorted keys, compact, ASCII."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def line_hash(line: bytes) -> str:
    """What the next record's ``prev`` must be: SHA-256 of this line's bytes (no newline)."""
    return hashlib.sha256(line).hexdigest()


@dataclass
class Verification:
    """The result of walking the chain: ``records`` lines, ``problems`` one line each, naming the
    line (``audit.jsonl line 17: hash mismatch (record edited?)``), and the last record's hash."""

    records: int = 0
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0
    last_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_lines(fname: str, raw: bytes | None, head: tuple[int, str] | None, head_exists: bool,
                 expect_head: str | None = None) -> Verification:
    """Check every record's own hash, every ``prev`` link and the ``seq`` sequence, then the head
    file and an optional externally kept head hash. Pure: bytes in, findings out."""
    v = Verification()
    where = fname
    if raw is None:
        if head_exists:
            v.problems.append(f"{where} is missing but {HEAD_FILENAME} records seq {head[0] if head else '?'} "
                              f"(log deleted?)")
        if expect_head:
            v.problems.append(f"{where} is missing; it cannot contain head {expect_head}")
        return v
    parts = raw.split(b"\n")
    torn = parts[-1] != b""
    if not torn:
        parts.pop()
    prev_hash, prev_seq, prev_edited = GENESIS, 0, False
    hashes: dict[int, str] = {}
    for i, line in enumerate(parts, 1):
        v.records += 1
        here = f"{where} line {i}"
        if torn and i == len(parts):
            v.problems.append(f"{here}: incomplete last record (file truncated?)")
            break
        rec = parse_line(line)
        if rec is None:
            v.problems.append(f"{here}: not a valid audit record (edited, inserted or truncated?)")
            prev_hash, prev_seq, prev_edited = line_hash(line), prev_seq + 1, True  # it stood for one record
            continue
        edited = rec.get("hash") != record_hash(rec)
        if edited:
            v.problems.append(f"{here}: hash mismatch (record edited?)")
        seq = rec["seq"]
        in_order = seq == prev_seq + 1
        if rec.get("prev") != prev_hash and not (prev_edited and in_order):  # an edited line breaks the next link too
            if i == 1:
                v.problems.append(f"{here}: prev is not the genesis value (records removed from the start?)")
            else:
                v.problems.append(f"{here}: prev does not match line {i - 1} (record removed, inserted or reordered)")
        if seq > prev_seq + 1:
            missing = f"seq {prev_seq + 1}" if seq == prev_seq + 2 else f"seq {prev_seq + 1}..{seq - 1}"
            v.problems.append(f"{here}: seq {seq} follows seq {prev_seq}: {missing} missing")
        elif seq <= prev_seq:
            v.problems.append(f"{here}: seq {seq} follows seq {prev_seq} (duplicated or reordered)")
        hashes.setdefault(seq, str(rec.get("hash")))
        prev_hash, prev_seq, prev_edited = line_hash(line), seq, edited
        v.last_seq, v.last_hash = seq, str(rec.get("hash"))
    if head is not None:
        hseq, hhash = head
        if hseq > v.last_seq:
            v.problems.append(f"{HEAD_FILENAME}: records seq {hseq} but {where} ends at seq {v.last_seq} "
                              f"(records removed from the end?)")
        elif hashes.get(hseq) != hhash:
            v.problems.append(f"{HEAD_FILENAME}: seq {hseq} has hash {hhash[:16]}... but {where} has "
                              f"{str(hashes.get(hseq))[:16]}... (log rewritten?)")
    elif head_exists:
        v.problems.append(f"{HEAD_FILENAME}: unreadable (edited?)")
    if expect_head and expect_head not in hashes.values():
        v.problems.append(f"head {expect_head[:16]}... is not in {where} (records removed, or the chain rewritten)")
    return v


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record, or None if the line is not one (bad JSON, missing or mistyped fields)."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or not isinstance(rec.get("prev"), str) \
            or not isinstance(rec.get("event"), str):
        return None
    return rec
