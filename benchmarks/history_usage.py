"""Usage report benchmark: a month of records, per pool and hour or day.

Fills a store with `--records` (default 720,000: 1,000 calls an hour for 30
days, six pools; see history_records.py) and 4 scale events a pool per hour,
then times `HistoryStore.usage` over the whole month, every pool, by hour
(720 buckets) and by day (30), and for one pool:

  cold     the first report: nothing cached, every bucket computed from the
           records (once after an upgrade to schema 3, or after retention
           dropped old marks)
  warm     the same report again: every bucket cached
  steady   the report right after a fresh batch of 50 records (ended now)
           was added, as on a live server: the batch forgot the current
           hour's and day's buckets, which the report recomputes

Target: steady and warm ≤ 200 ms. SQLite is filled through
`SqliteHistory.add`; PostgreSQL (a throwaway cluster) with COPY (see
history_query.py). `--keep DIR` keeps the SQLite file to rerun without
refilling (its cache is dropped first, so `cold` is cold).

    .venv/bin/python benchmarks/history_usage.py
    .venv/bin/python benchmarks/history_usage.py --backends sqlite --records 72000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from history_query import fill_postgres, fill_sqlite
from history_records import POOLS, START, PostgresServer, records

from trunkline.stores import HistoryStore, JobFilter
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory
from trunkline.stores.usage import ScaleEventRecord

TARGET_MS = 200.0
DAY = 86_400.0
HOUR = 3600.0


def scale_events(days: float) -> list[ScaleEventRecord]:
    out = []
    n = 0
    for h in range(int(days * 24)):
        for pool in POOLS:
            for k in range(4):
                n += 1
                out.append(
                    ScaleEventRecord(
                        event_id=f"SE_{n:08d}",
                        at=START + h * HOUR + k * 900 + 7,
                        pool=pool,
                        kind=("up", "down")[k % 2],
                        from_replicas=3,
                        to_replicas=4 if k % 2 == 0 else 3,
                        desired=4,
                        reason="demand 13 > 3 x 4 slots - 1 spare",
                    )
                )
    return out


async def timed(store: HistoryStore, **kw: Any) -> tuple[float, int, float]:
    """(wall ms, rows, this process's CPU ms: all its threads, not the
    PostgreSQL server's)."""
    t0, c0 = time.perf_counter(), time.process_time()
    rows = await store.usage(**kw)
    return (time.perf_counter() - t0) * 1000, len(rows), (time.process_time() - c0) * 1000


async def drop_cache(store: HistoryStore) -> None:
    if isinstance(store, SqliteHistory):

        def drop() -> None:
            store._w.conn().execute("DELETE FROM trunkline_usage_done")

        await store._w.run(drop)
    elif isinstance(store, PostgresHistory):
        await store._require().execute("DELETE FROM trunkline_usage_done")


async def measure(store: HistoryStore, args: argparse.Namespace) -> list[dict[str, Any]]:
    end = START + args.days * DAY
    template = next(iter(records(1, days=1)))
    out = []
    fresh = 0
    for bucket in ("hour", "day"):
        for pool in (None, "support"):
            kw: dict[str, Any] = {"since": START, "until": end, "bucket": bucket, "pool": pool}
            await drop_cache(store)
            cold, n, _ = await timed(store, **kw)
            warm_runs = [await timed(store, **kw) for _ in range(args.rounds)]
            warm = [w for w, _, _ in warm_runs]
            steady = []
            steady_cpu = []
            for _ in range(args.rounds):
                batch = []
                for _ in range(50):
                    fresh += 1
                    t = end - 120 + fresh * 0.01
                    batch.append(
                        dataclasses.replace(
                            template,
                            job_id=f"AJ_fresh{fresh:08d}",
                            created_at=t - 180,
                            placed_at=t - 179.5,
                            running_at=t - 179.3,
                            ended_at=t,
                        )
                    )
                await store.add(batch)
                wall, _, cpu = await timed(store, **kw)
                steady.append(wall)
                steady_cpu.append(cpu)
            row = {
                "bucket": bucket,
                "pool": pool or "every pool",
                "rows": n,
                "cold_ms": cold,
                "warm_p50_ms": sorted(warm)[len(warm) // 2],
                "warm_max_ms": max(warm),
                "steady_p50_ms": sorted(steady)[len(steady) // 2],
                "steady_max_ms": max(steady),
                "warm_cpu_ms": sorted(c for _, _, c in warm_runs)[len(warm) // 2],
                "steady_cpu_ms": sorted(steady_cpu)[len(steady_cpu) // 2],
            }
            out.append(row)
            print(
                f"  {bucket:4} {row['pool']:10} {n:5} rows  cold {cold:7.0f} ms  "
                f"warm p50 {row['warm_p50_ms']:6.1f} max {row['warm_max_ms']:6.1f} ms  "
                f"steady p50 {row['steady_p50_ms']:6.1f} max {row['steady_max_ms']:6.1f} ms  "
                f"CPU p50 warm {row['warm_cpu_ms']:5.1f} steady {row['steady_cpu_ms']:5.1f} ms",
                flush=True,
            )
    return out


async def run(args: argparse.Namespace) -> int:
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="trunkline-usage-") as tmp:
        for backend in args.backends:
            print(f"{backend}: {args.records:,} records over {args.days:g} days", flush=True)
            server = None
            store: HistoryStore
            if backend == "sqlite":
                where = Path(args.keep or tmp) / "usage.sqlite3"
                store = SqliteHistory(where)
                await store.open()
                await fill_sqlite(store, args.records, args.days)
            else:
                server = PostgresServer()
                server.start()
                store = PostgresHistory(server.url())
                await store.open()
                await fill_postgres(store, args.records, args.days)
            try:
                if not await store.scale_events(limit=1):
                    evs = scale_events(args.days)
                    for i in range(0, len(evs), 2000):
                        await store.add_scale_events(evs[i : i + 2000])
                total = await store.count(JobFilter())
                print(f"  {total:,} records, {len(scale_events(args.days)):,} scale events")
                for row in await measure(store, args):
                    worst = max(worst, row["warm_max_ms"], row["steady_p50_ms"])
            finally:
                await store.close()
                if server is not None:
                    server.stop()
    ok = worst <= TARGET_MS
    print(f"worst warm max / steady p50: {worst:.1f} ms (target <= {TARGET_MS:.0f} ms): "
          + ("ok" if ok else "OVER") + f"; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=720_000)
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    p.add_argument("--keep", help="keep the SQLite file in this directory")
    args = p.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
