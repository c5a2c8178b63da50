"""Audit records of a fleet node while its database is down (certd.store.auditspool), on a
private PostgreSQL cluster this module stops and starts: spooled locally, appended to the chain
once it is back, exactly once even when a replay is cut short after its commit."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from certd.core.clock import SystemClock
from certd.core.errors import StoreError
from certd.core.events import LifecycleEvent
from certd.store.auditspool import SpoolingAudit
from certd.store.pg import POOL_WAIT, PgStore
from tests.support.delay_proxy import DelayProxy
from tests.support.postgres import PgCluster


class CutAfterCommit:
    """The chain, with a replay that loses power right after its transaction committed."""

    def __init__(self, chain: Any) -> None:
        self.chain = chain

    def append(self, ev: LifecycleEvent, spool_id: str | None = None) -> dict[str, Any] | None:
        return self.chain.append(ev, spool_id)  # type: ignore[no-any-return]

    def append_spooled(self, records: list[tuple[str, dict[str, Any]]]) -> int:
        self.chain.append_spooled(records)
        raise RuntimeError("power lost before the spool was truncated")



def ev(kind: str, n: int) -> LifecycleEvent:
    return LifecycleEvent(kind, "www", SystemClock().now(), initiator="uid=0(root)", reason=f"#{n}",
                          detail={"node": "web1"})


def test_records_emitted_while_the_database_is_down_land_in_the_chain_once(tmp_path: Path,
                                                                           own_postgres: PgCluster) -> None:
    """Records emitted during an outage are spooled 0600, then chained in order exactly once, even after a cut replay."""
    with PgStore(own_postgres.database(), node="web1") as store:
        spool = SpoolingAudit(store.audit, tmp_path / "state", "web1", SystemClock())
        spool(ev("renew_refused", 0))
        own_postgres.stop()
        started = time.monotonic()
        for n in range(1, 4):
            spool(ev("renew_refused", n))
        assert time.monotonic() - started < POOL_WAIT + 5  # one pool wait, then straight to the spool
        assert spool.pending() == 3
        assert stat.S_IMODE(spool.path.stat().st_mode) == 0o600  # in a state dir it created (0700)
        assert stat.S_IMODE(spool.path.parent.stat().st_mode) == 0o700
        with pytest.raises(StoreError, match="database unreachable"):
            spool.replay()
        assert spool.pending() == 3

        own_postgres.start()
        cut = SpoolingAudit(CutAfterCommit(store.audit), tmp_path / "state", "web1", SystemClock())
        with pytest.raises(RuntimeError, match="power lost"):
            cut.replay()
        assert spool.pending() == 3  # committed, not truncated: the next replay must not duplicate
        assert spool.replay() == 0
        assert spool.pending() == 0
        spool(ev("renew_refused", 4))

        records = store.audit.records
        assert [(r["event"], r["reason"]) for r in records] == [
            ("renew_refused", "#0"), ("renew_refused", "#1"), ("renew_refused", "#2"), ("renew_refused", "#3"),
            ("renew_refused", "#4")]
        assert all(r["detail"]["node"] == "web1" and r["initiator"] == "uid=0(root)" for r in records)
        assert len({r["detail"].get("spool_id") for r in records[1:4]}) == 3
        assert store.audit.verify().ok


def test_a_record_whose_commit_reply_was_lost_is_chained_once(tmp_path: Path, postgres: str) -> None:
    """The connection drops after the server committed a record: it is spooled, and the replay does not chain it twice."""
    port = int(re.search(r"port=(\d+)", postgres).group(1))  # type: ignore[union-attr]
    with DelayProxy(port) as proxy, PgStore(re.sub(r"port=\d+", f"port={proxy.port}", postgres),
                                             node="web1", pool_size=1) as store:
        spool = SpoolingAudit(store.audit, tmp_path / "state", "web1", SystemClock())
        spool(ev("renew_refused", 0))  # the pool's connection is up and configured
        proxy.cut_after(b"COMMIT")
        spool(ev("renew_refused", 1))  # committed by the server; certd hears nothing back
        assert proxy.cuts == 1 and spool.pending() == 1
        assert spool.replay() == 0
        assert spool.pending() == 0
        spool(ev("renew_refused", 2))
        assert [r["reason"] for r in store.audit.records] == ["#0", "#1", "#2"]
        assert store.audit.verify().ok
