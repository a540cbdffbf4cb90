"""History query benchmark: filtered pages over 1,000,000 stored records.

Fills a store with `--records` (default 1,000,000) realistic records (a month
of six pools, 20,000 callers; see history_records.py), then times the first
page (50 records, the API's page) and the next one of each query, through
the store's own `query` (thread hop and record parsing included), each with
`--draws` random parameters:

  pool + 1 h range   agent_name and since/until one hour apart, anywhere in the month
  pool + 1 day range the same over a day
  pool, last 24 h    agent_name and since only (the `--since 24h` case)
  caller             one caller number (a frequent one or a rare one)
  caller + 1 week    caller and a week's range
  no_capacity + pool a week of refusals in one pool
  everything         no filter, the newest

Target: every first page ≤ 50 ms at p99. SQLite is filled through
`SqliteHistory.add` (its fill rate is printed); PostgreSQL (a throwaway
cluster, fsync on) with COPY, then ANALYZE, which autovacuum does on a live
database. `--keep DIR` keeps the SQLite file to rerun without refilling.
`--compare-v3` then times the same pool and caller pages, cold, through a
copy of schema v3's index (no created_at) and through v4's.
`--cold` first drops the SQLite file from the OS page cache (posix_fadvise
DONTNEED on that file only) and reopens the store, so every query starts from
the disk: a month of history that is not in memory, as after a reboot or when
the history is much larger than the RAM left for the page cache.

    .venv/bin/python benchmarks/history_query.py
    .venv/bin/python benchmarks/history_query.py --backends sqlite --keep /tmp/h1m
    .venv/bin/python benchmarks/history_query.py --backends sqlite --keep /tmp/h1m --cold
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from history_records import CALLERS, POOLS, START, PostgresServer, caller, records

from trunkline.stores import HistoryStore, JobFilter, _sql
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory

TARGET_MS = 50.0
PAGE = 50
DAY = 86_400.0
HOUR = 3600.0


def queries(rng: random.Random, days: float) -> dict[str, JobFilter]:
    """One draw of every query kind."""
    t = START + rng.uniform(0, days * DAY - 7 * DAY)
    pool = rng.choice(POOLS)
    who = caller(rng.choice([0, 1, 2, rng.randrange(CALLERS)]))
    end = START + days * DAY
    return {
        "pool + 1 h range": JobFilter(agent_name=pool, since=t, until=t + HOUR),
        "pool + 1 day range": JobFilter(agent_name=pool, since=t, until=t + DAY),
        "pool, last 24 h": JobFilter(agent_name=pool, since=end - DAY),
        "caller": JobFilter(caller=who),
        "caller + 1 week": JobFilter(caller=who, since=t, until=t + 7 * DAY),
        "no_capacity + pool": JobFilter(
            states=frozenset({"no_capacity"}), agent_name=pool, since=t, until=t + 7 * DAY
        ),
        "everything": JobFilter(),
    }


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


async def fill_sqlite(store: SqliteHistory, n: int, days: float) -> None:
    have = await store.count(JobFilter())
    if have >= n:
        print(f"  reusing {have:,} records")
        return
    t0 = time.perf_counter()
    batch: list[Any] = []
    for r in records(n - have, days=days, first=have):
        batch.append(r)
        if len(batch) == 5000:
            await store.add(batch)
            batch = []
    if batch:
        await store.add(batch)
    dt = time.perf_counter() - t0
    print(f"  filled {n - have:,} records through add() in {dt:.0f} s = {(n - have) / dt:,.0f}/s")


async def fill_postgres(store: PostgresHistory, n: int, days: float) -> None:
    t0 = time.perf_counter()
    pool = store._require()
    async with pool.acquire() as conn:
        chunk: list[tuple[Any, ...]] = []
        lo, hi = 0.0, 0.0
        for r in records(n, days=days):
            chunk.append(_sql.to_row(r))
            if len(chunk) == 20_000:
                a, b = _sql.spans(chunk)
                lo, hi = min(lo, a), max(hi, b)
                await conn.copy_records_to_table(
                    "trunkline_jobs", records=chunk, columns=_sql.COLUMNS
                )
                chunk = []
        if chunk:
            a, b = _sql.spans(chunk)
            lo, hi = min(lo, a), max(hi, b)
            await conn.copy_records_to_table("trunkline_jobs", records=chunk, columns=_sql.COLUMNS)
        await conn.execute("UPDATE trunkline_job_spans SET lo = $1, hi = $2", lo, hi)
        await conn.execute("ANALYZE trunkline_jobs")
    print(f"  filled {n:,} records with COPY in {time.perf_counter() - t0:.0f} s")


def evict(path: Path) -> None:
    """Drop `path`'s pages from the OS page cache (this file only)."""
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def measure(store: HistoryStore, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(5)
    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    nexts: dict[str, list[float]] = {}
    sizes: dict[str, list[int]] = {}
    for _ in range(args.draws):
        for name, flt in queries(rng, args.days).items():
            t0, c0 = time.perf_counter(), time.process_time()
            page = await store.query(flt, limit=PAGE)
            times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            cpus.setdefault(name, []).append((time.process_time() - c0) * 1e3)
            sizes.setdefault(name, []).append(len(page.records))
            if page.next_cursor is not None:
                t0 = time.perf_counter()
                await store.query(flt, limit=PAGE, cursor=page.next_cursor)
                nexts.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {}
    head = f"{'first page p50':>15s} {'p99':>9s} {'max':>9s} {'next page p99':>14s}"
    print(f"  {'query':22s} {head} {'CPU p50':>9s} {'p99':>9s}  rows")
    for name, ts in times.items():
        nx = nexts.get(name, [float("nan")])
        row = {
            "p50_ms": pct(ts, 50),
            "p99_ms": pct(ts, 99),
            "max_ms": max(ts),
            "next_p99_ms": pct(nx, 99),
            "cpu_p50_ms": pct(cpus[name], 50),
            "cpu_p99_ms": pct(cpus[name], 99),
            "mean_rows": sum(sizes[name]) / len(sizes[name]),
        }
        out[name] = row
        print(
            f"  {name:22s} {row['p50_ms']:12.2f} ms {row['p99_ms']:6.2f} ms {row['max_ms']:6.2f} ms"
            f" {row['next_p99_ms']:11.2f} ms"
            f" {row['cpu_p50_ms']:6.2f} ms {row['cpu_p99_ms']:6.2f} ms"
            f"  {row['mean_rows']:.0f}"
        )
    worst = max(r["p99_ms"] for r in out.values())
    ok = worst <= TARGET_MS
    print(f"  {'PASS' if ok else 'FAIL'}: every first page p99 {worst:.1f} ms <= {TARGET_MS} ms")
    load = os.getloadavg()[0]
    print(f"  (load average {load:.1f}, {os.cpu_count()} cores; CPU: the query's process time)")
    return {"queries": out, "pass": ok}


# Schema v3's indexes (no created_at), rebuilt beside v4's by --compare-v3.
V3_INDEXES = {
    "pool": ("agent_name", "bench_v3_pool", ""),
    "caller": ("sip_from", "bench_v3_from", " WHERE sip_from IS NOT NULL"),
}
V3_KINDS = {"pool + 1 h range": "pool", "pool + 1 day range": "pool", "caller + 1 week": "caller"}


def compare_v3(path: Path, draws: int) -> dict[str, Any]:
    """Cold first pages through schema v3's index vs v4's, same draws (raw
    SQL, `INDEXED BY`); the v3 copies are built for this and dropped after."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for col, name, where in V3_INDEXES.values():
            db.execute(
                f"CREATE INDEX IF NOT EXISTS {name} ON trunkline_jobs"
                f" ({col}, ended_at, job_id){where}"
            )
        out: dict[str, Any] = {}
        for label in ("v3", "v4"):
            evict(path)
            db.execute("PRAGMA cache_size=-32768")
            rng = random.Random(77)
            times: dict[str, list[float]] = {}
            for _ in range(draws):
                qs = queries(rng, 30.0)
                for kind, which in V3_KINDS.items():
                    _, v3name, _ = V3_INDEXES[which]
                    index = (
                        v3name
                        if label == "v3"
                        else f"trunkline_jobs_by_{'pool' if which == 'pool' else 'sip_from'}"
                    )
                    w = _sql.where(qs[kind], None, lambda i: "?", "trunkline_job_spans")
                    sql = (
                        f"SELECT {_sql.SELECT_COLUMNS} FROM trunkline_jobs INDEXED BY {index}"
                        f"{w.sql()} ORDER BY ended_at DESC, job_id DESC LIMIT {PAGE + 1}"
                    )
                    t0 = time.perf_counter()
                    db.execute(sql, w.args).fetchall()
                    times.setdefault(kind, []).append((time.perf_counter() - t0) * 1e3)
            for kind, ts in times.items():
                row = {"p50_ms": pct(ts, 50), "p90_ms": pct(ts, 90), "max_ms": max(ts)}
                out.setdefault(kind, {})[label] = row
                print(
                    f"  cold {label} {kind:20s} p50 {row['p50_ms']:7.2f} ms  "
                    f"p90 {row['p90_ms']:7.2f} ms  max {row['max_ms']:7.2f} ms"
                )
        return out
    finally:
        for _, name, _ in V3_INDEXES.values():
            db.execute(f"DROP INDEX IF EXISTS {name}")
        db.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if backend == "sqlite":
            base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="trunkline-q-"))
            path = base / "history.sqlite3"
            print(f"\n[SQLite {path}] {args.records:,} records")
            store = SqliteHistory(path)
            await store.open()
            try:
                await fill_sqlite(store, args.records, args.days)
                size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
                print(f"  files: {size:.2f} GB, schema version {await store.schema()}")
                if args.cold:
                    await store.close()
                    evict(path)
                    print("  dropped from the OS page cache: every query starts cold")
                    store = SqliteHistory(path)
                    await store.open()
                out["sqlite"] = await measure(store, args)
                if args.compare_v3:
                    await store.close()
                    print("  schema v3 vs v4 index, cold, raw SQL:")
                    out["sqlite"]["v3_vs_v4"] = await asyncio.to_thread(
                        compare_v3, path, args.draws
                    )
                    store = SqliteHistory(path)
                    await store.open()
            finally:
                await store.close()
        elif backend == "postgresql":
            pg = PostgresServer(durable=True)
            await asyncio.to_thread(pg.start)
            try:
                print(f"\n[PostgreSQL (local)] {args.records:,} records")
                store = PostgresHistory(pg.url())
                await store.open()
                try:
                    await fill_postgres(store, args.records, args.days)
                    out["postgresql"] = await measure(store, args)
                finally:
                    await store.close()
            finally:
                await asyncio.to_thread(pg.stop)
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--draws", type=int, default=40, help="random parameters per query kind")
    p.add_argument("--keep", metavar="DIR", help="keep (and reuse) the SQLite file in DIR")
    p.add_argument("--cold", action="store_true", help="SQLite: start from a cold page cache")
    p.add_argument(
        "--compare-v3", action="store_true", help="SQLite: also time schema v3's index, cold"
    )
    args = p.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    out = asyncio.run(run(args))
    ok = all(v["pass"] for v in out.values())
    print(f"\n{'PASS' if ok else 'FAIL'}: history query targets")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
