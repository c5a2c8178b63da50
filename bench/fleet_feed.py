#!/usr/bin/env python3
"""Fleet change-feed benchmark (issue 16): what the desired-version feed of idle nodes costs the
shared database, and how soon a node sees a new desired version.

N subscribers (one per node, as certd.daemon.fleet holds) wait on ``changes(timeout=1.0)`` in a
loop for D seconds over a database with C certificates; K desired versions move meanwhile. The
database's own counters for ``certd_desired`` (pg_stat_user_tables: scans, rows read) say what
the feed read; the subscribers say how long after each commit they saw the change (p50/max).
PostgreSQL is a private cluster on loopback (tests/support/postgres.py). No CA.

Usage: .venv/bin/python bench/fleet_feed.py [--nodes 3] [--certs 2000] [--seconds 20] [--moves 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from certd.store.pg import PgStore  # noqa: E402
from tests.support.postgres import start_cluster  # noqa: E402

STATS = ("SELECT seq_scan, seq_tup_read, COALESCE(idx_scan, 0), COALESCE(idx_tup_fetch, 0) "
         "FROM pg_stat_user_tables WHERE relname = 'certd_desired'")


def _stats(dsn: str) -> tuple[int, ...]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(STATS).fetchone()
        assert row is not None
        return tuple(int(x) for x in row)


def run(nodes: int, certs: int, seconds: float, moves: int) -> None:
    cluster = start_cluster()
    try:
        dsn = cluster.database()
        stores = [PgStore(dsn, node=f"node{i}") for i in range(nodes)]  # the first makes the schema
        names = [f"cert{i:05d}" for i in range(certs)]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO certd_desired SELECT unnest(%s::text[]), 1", (names,))
        subs = [s.subscribe(names) for s in stores]
        seen: list[float] = []
        moved_at: dict[str, float] = {}
        stop = threading.Event()
        lock = threading.Lock()

        def wait(i: int) -> None:
            while not stop.is_set():
                for change in subs[i].changes(timeout=1.0):
                    with lock:
                        if change.name in moved_at:
                            seen.append(time.monotonic() - moved_at[change.name])

        time.sleep(1.5)  # the pool's first connections and a stats flush (PGSTAT_MIN_INTERVAL 1 s)
        before = _stats(dsn)
        threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(nodes)]
        for t in threads:
            t.start()
        started = time.monotonic()
        for k in range(moves):
            time.sleep(seconds / (moves + 1))
            name = names[(k * 7919) % certs]
            with psycopg.connect(dsn) as conn:  # what PgStore.set_desired commits (no lease, no version row)
                conn.execute("UPDATE certd_desired SET version = version + 1 WHERE name = %s", (name,))
                conn.execute("SELECT pg_notify('certd_desired', %s)", (name,))
                with lock:
                    moved_at[name] = time.monotonic()
                conn.commit()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        stop.set()
        for t in threads:
            t.join(timeout=5)
        for sub in subs:
            sub.close()
        for store in stores:
            store.close()  # backends exit: their counters are flushed
        time.sleep(1.5)
        after = _stats(dsn)
        d = [a - b for a, b in zip(after, before)]
        took = sorted(seen)
        print(f"fleet feed: {nodes} idle nodes, {certs} certificates, {seconds:g} s, {moves} moves")
        print(f"  certd_desired: {d[0]} seq scans ({d[1]} rows read), {d[2]} index scans ({d[3]} rows); "
              f"per node per minute: {(d[1] + d[3]) * 60 / seconds / nodes:.0f} rows")
        if took:
            print(f"  move -> seen: p50 {statistics.median(took) * 1000:.0f} ms, max {took[-1] * 1000:.0f} ms "
                  f"({len(took)} of {moves * nodes})")
    finally:
        cluster.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--certs", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--moves", type=int, default=10)
    a = ap.parse_args()
    run(a.nodes, a.certs, a.seconds, a.moves)


if __name__ == "__main__":
    main()
