"""The fleet node's audit spool (certd.store.auditspool) against an in-memory chain: order kept,
one pool wait per outage, a torn line neither glued to the next record nor fatal."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable
from certd.core.events import LifecycleEvent
from certd.store.auditspool import RETRY, SpoolingAudit

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class MemoryChain:
    """The ChainAppender protocol in memory; ``down``: every append fails as PgStore's does."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.down = False
        self.tries = 0

    def append(self, ev: LifecycleEvent, spool_id: str | None = None) -> dict[str, Any] | None:
        self.tries += 1
        if self.down:
            raise StoreUnreachable("PostgreSQL store: database unreachable: no connection within 5 s")
        self.records.append({"event": ev.kind, "reason": ev.reason, "detail": dict(ev.detail), "id": spool_id})
        return self.records[-1]

    def append_spooled(self, records: list[tuple[str, dict[str, Any]]]) -> int:
        if self.down:
            raise StoreUnreachable("PostgreSQL store: database unreachable")
        seen = {r["id"] for r in self.records}
        new = [{**r, "id": sid} for sid, r in records if sid not in seen]
        self.records += new
        return len(new)


def ev(n: int) -> LifecycleEvent:
    return LifecycleEvent("renew_refused", "www", NOW, initiator="ops", reason=f"#{n}", detail={"node": "web1"})


def test_records_keep_their_order_and_the_database_is_tried_once_per_retry_interval(tmp_path: Path) -> None:
    """Down: one failed try, then spooled without trying; back: spool first, then the new record, in order."""
    clock, chain = FakeClock(NOW), MemoryChain()
    spool = SpoolingAudit(chain, tmp_path, "web1", clock)
    chain.down = True
    for n in (1, 2, 3):
        spool(ev(n))
    assert chain.tries == 1 and spool.pending() == 3
    chain.down = False
    spool(ev(4))  # within RETRY of the failure: still spooled, behind the others
    assert spool.pending() == 4 and not chain.records
    clock.advance(RETRY + 1)
    spool(ev(5))
    assert [r["reason"] for r in chain.records] == ["#1", "#2", "#3", "#4", "#5"]
    assert spool.pending() == 0


def test_a_torn_last_line_is_skipped_and_the_next_record_kept(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn line: the next record still lands whole, the torn one is dropped."""
    clock, chain = FakeClock(NOW), MemoryChain()
    spool = SpoolingAudit(chain, tmp_path, "web1", clock)
    spool.store_up = lambda: False
    spool(ev(1))
    with open(spool.path, "ab") as f:
        f.write(b'{"spool_id":"web1:torn","fields":{"event":"renew_re')
    spool(ev(2))
    spool.store_up = lambda: True
    assert spool.replay() == 2
    assert [r["reason"] for r in chain.records] == ["#1", "#2"]
    assert all(r["detail"]["node"] == "web1" and r["detail"]["spool_id"].startswith("web1:") for r in chain.records)
