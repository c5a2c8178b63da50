"""The audit log: hash chain, tamper detection that names the line, key-material refusal, modes,
and appends from several processes that never fork the chain."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from certd import fs as fsutil
from certd.ops.audit import GENESIS, AuditLog, AuditRefused, line_hash, record_hash
from certd.core.clock import FakeClock
from certd.core.events import EventBus, LifecycleEvent

CLOCK = FakeClock()


def ev(kind: str = "renewed", name: str = "www", **kw: object) -> LifecycleEvent:
    return LifecycleEvent(kind, name, CLOCK.now(), **kw)  # type: ignore[arg-type]


def filled(tmp_path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append(ev("renewed", "www", version=i + 1, new_serial=f"{i:04x}", reason=f"r{i}"))
    return log


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines()


def rewrite(log: AuditLog, new_lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def test_records_are_chained_from_genesis_with_sequential_seq(tmp_path: Path) -> None:
    """Record 1's prev is 64 zeros, each later prev is the SHA-256 of the previous line's bytes."""
    log = filled(tmp_path, 3)
    raw = lines(log)
    recs = [json.loads(x) for x in raw]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev"] == GENESIS
    assert recs[1]["prev"] == line_hash(raw[0]) and recs[2]["prev"] == line_hash(raw[1])
    assert all(r["hash"] == record_hash(r) for r in recs)
    assert log.head() == (3, recs[2]["hash"])
    v = log.verify()
    assert v.ok and v.records == 3


def test_record_carries_every_field(tmp_path: Path) -> None:
    """Each record has the documented fields; times are ISO 8601 UTC."""
    log = AuditLog(tmp_path / "audit.jsonl")
    rec = log.append(ev("forced", initiator="uid=0(root)", reason="incident 7", old_serial="0a",
                        not_after=CLOCK.now(), duration=1.23456, detail={"k": 1}))
    for f in ("seq", "time", "event", "name", "initiator", "reason", "old_serial", "new_serial", "spki_sha256",
              "not_after", "outcome", "duration", "version", "detail", "prev", "hash"):
        assert f in rec
    assert rec["time"].endswith("Z") and rec["initiator"] == "uid=0(root)" and rec["duration"] == 1.235


def test_file_is_private_and_mode_0600(tmp_path: Path) -> None:
    """The log and its head are created 0600 (no group configured)."""
    log = filled(tmp_path, 1)
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.head_path.stat().st_mode) == 0o600


def test_with_a_group_the_log_is_0640_owned_by_it(tmp_path: Path) -> None:
    """With control_group the log and head are 0640 and group-owned, for operators who may read them."""
    import grp
    log = AuditLog(tmp_path / "audit.jsonl", group="www-data")
    log.append(ev())
    gid = grp.getgrnam("www-data").gr_gid
    for p in (log.path, log.head_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640 and p.stat().st_gid == gid


@pytest.mark.parametrize("tamper, expected", [
    ("edit", "line 3: hash mismatch (record edited?)"),
    ("delete", "line 3: prev does not match line 2 (record removed, inserted or reordered)"),
    ("insert", "line 4: prev does not match line 3"),  # a well-forged line 3 breaks the link after it
    ("swap", "line 3: prev does not match line 2"),
    ("truncate", "line 6: incomplete last record (file truncated?)"),
    ("drop_last", "audit.head: records seq 6 but audit.jsonl ends at seq 5"),
    ("rehash", "line 4: prev does not match line 3"),
    ("garbage", "line 3: not a valid audit record"),
])
def test_each_kind_of_tampering_is_detected_and_located(tmp_path: Path, tamper: str, expected: str) -> None:
    """Edit, delete, insert, swap, truncate, drop the tail, re-hash an edit: verify names the line."""
    log = filled(tmp_path)
    raw = lines(log)
    if tamper == "edit":
        raw[2] = raw[2].replace(b'"reason": "r2"', b'"reason": "r9"')
    elif tamper == "delete":
        del raw[2]
    elif tamper == "insert":
        forged = json.loads(raw[1])
        forged.update(seq=3, reason="forged", prev=line_hash(raw[1]))
        forged["hash"] = record_hash(forged)
        raw.insert(2, json.dumps(forged).encode())
    elif tamper == "swap":
        raw[2], raw[3] = raw[3], raw[2]
    elif tamper == "rehash":  # an edit whose own hash was recomputed still breaks the next link
        rec = json.loads(raw[2])
        rec["reason"] = "covered up"
        rec["hash"] = record_hash(rec)
        raw[2] = json.dumps(rec).encode()
    elif tamper == "garbage":
        raw[2] = b"{not json"
    if tamper == "truncate":
        data = log.path.read_bytes()
        log.path.write_bytes(data[:-20])
    elif tamper == "drop_last":
        rewrite(log, raw[:-1])
    else:
        rewrite(log, raw)
    v = log.verify()
    assert not v.ok
    assert any(expected in p for p in v.problems), v.problems
    assert all(p.startswith(("audit.jsonl line ", "audit.head:")) for p in v.problems), v.problems


def test_deleted_record_also_shows_as_a_seq_gap(tmp_path: Path) -> None:
    """Removing a record in the middle names the missing seq."""
    log = filled(tmp_path)
    raw = lines(log)
    del raw[2]
    rewrite(log, raw)
    assert "audit.jsonl line 3: seq 4 follows seq 2: seq 3 missing" in log.verify().problems


def test_externally_kept_head_detects_a_rewritten_chain(tmp_path: Path) -> None:
    """A chain rebuilt from scratch passes its own checks, but not against a head hash kept elsewhere."""
    log = filled(tmp_path, 3)
    head = log.head()
    assert head is not None and log.verify(expect_head=head[1]).ok
    log.path.unlink()
    log.head_path.unlink()
    for i in range(3):
        log.append(ev("renewed", "www", reason=f"forged {i}"))
    assert log.verify().ok
    v = log.verify(expect_head=head[1])
    assert not v.ok and "is not in audit.jsonl" in v.problems[0]


def test_missing_log_with_a_head_is_reported(tmp_path: Path) -> None:
    """Deleting the whole log is noticed while audit.head remains; no log and no head is simply empty."""
    assert AuditLog(tmp_path / "none" / "audit.jsonl").verify().ok
    log = filled(tmp_path, 2)
    log.path.unlink()
    assert "audit.jsonl is missing but audit.head records seq 2" in log.verify().problems[0]


def test_appends_after_a_torn_last_line_keep_the_chain_checkable(tmp_path: Path) -> None:
    """A torn tail (crash, truncation) stays reported, and new records chain on after it."""
    log = filled(tmp_path, 3)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-10])
    rec = log.append(ev("renewed"))
    assert rec["seq"] == 4  # the torn line stood for seq 3
    v = log.verify()
    assert v.problems == ["audit.jsonl line 3: not a valid audit record (edited, inserted or truncated?)"]


def test_record_with_private_key_material_is_refused(tmp_path: Path) -> None:
    """A record holding a PEM private-key marker is never written."""
    log = filled(tmp_path, 1)
    before = log.path.read_bytes()
    with pytest.raises(AuditRefused):
        log.append(ev("renewal_failed", reason="oops -----BEGIN EC PRIVATE KEY-----\nMHc..."))
    with pytest.raises(AuditRefused):
        log.append(ev("renewal_failed", detail={"x": "-----BEGIN PRIVATE KEY-----"}))
    assert log.path.read_bytes() == before
    # through the bus: the sink fails, the caller does not
    bus = EventBus()
    bus.subscribe(log)
    bus.emit(ev("renewal_failed", reason="-----END RSA PRIVATE KEY-----"))
    assert log.path.read_bytes() == before


def _append_many(path: str, tag: str, n: int) -> None:
    log = AuditLog(Path(path))
    for i in range(n):
        log.append(LifecycleEvent("verified", tag, CLOCK.now(), version=i))


def test_concurrent_processes_never_fork_the_chain(tmp_path: Path) -> None:
    """Four processes appending 50 records each: 200 records, seq 1..200, chain intact."""
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), f"p{k}", 50)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = AuditLog(path)
    v = log.verify()
    assert v.ok, v.problems[:5]
    assert v.records == 200 and [r["seq"] for r in log.records()] == list(range(1, 201))
    assert os.path.getsize(path) > 0


def test_concurrent_threads_share_writes_and_never_fork_the_chain(tmp_path: Path) -> None:
    """Eight threads appending 40 records each: 320 records, seq 1..320, chain intact, each
    caller gets its own record back, and fewer writes than records (group commit)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    writes = 0
    real = log._append_locked

    def counting(batch: list[dict[str, object]]) -> list[dict[str, object]]:
        nonlocal writes
        writes += 1
        return real(batch)
    log._append_locked = counting  # type: ignore[method-assign]
    got: dict[str, list[int]] = {}

    def worker(tag: str) -> None:
        got[tag] = [int(log.append(ev("verified", tag, version=i))["version"]) for i in range(40)]
    threads = [threading.Thread(target=worker, args=(f"t{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    v = AuditLog(path).verify()
    assert v.ok, v.problems[:5]
    assert v.records == 320 and [r["seq"] for r in log.records()] == list(range(1, 321))
    assert all(got[f"t{k}"] == list(range(40)) for k in range(8))
    assert writes < 320


def test_verify_during_appends_never_reports_a_false_tamper(tmp_path: Path) -> None:
    """Verifying while another process appends always sees a consistent log and head."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append(ev())
    ctx = multiprocessing.get_context("fork")
    writer = ctx.Process(target=_append_many, args=(str(path), "w", 150))
    writer.start()
    log, checks = AuditLog(path), 0
    while writer.is_alive() or checks == 0:
        v = log.verify()
        assert v.ok, v.problems
        checks += 1
    writer.join(60)
    assert writer.exitcode == 0 and log.verify().records == 151


def test_records_inside_an_operation_leave_the_head_until_its_end_is_recorded(tmp_path: Path) -> None:
    """issued/deployed ride on the operation's last record: no fsync, no head, until renewed."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(ev("renewed"))
    with fsutil.counting_fsyncs() as count:
        log.append(ev("issued"))
        log.append(ev("deployed"))
    assert count.total == 0 and log.head() is not None and log.head()[0] == 1  # type: ignore[index]
    assert log.verify().ok  # a head behind the file is no tamper sign
    with fsutil.counting_fsyncs() as count:
        last = log.append(ev("renewed"))
    assert count.total == 2  # the log (every line before it too) and the head
    assert log.head() == (4, last["hash"]) and log.verify().ok
