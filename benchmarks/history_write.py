"""History write benchmark: 1,000 ended-job records/s sustained, through the
server's own path (`HistoryWriter.put` -> batches -> the store), on SQLite
and on PostgreSQL.

For each backend: a fresh store (SQLite in a temp data dir; PostgreSQL a
throwaway cluster from Debian's binaries with fsync on, or `--postgres-url`),
then

(a) sustained: `--rate` records/s (default 1,000) put at exact times for
    `--seconds` (default 20). Reported: records written per second, the lag
    from `put` to the batch's commit (p50/p99/max: what a `kill -9` loses is
    the records younger than that), the most records pending, records shed,
    and the process CPU per record. Target: the rate held, none shed, lag p99
    under 1 s (the window docs/history.md states).
(b) headroom: 50,000 records put at once; the time until all are committed
    gives the most records/s the writer sustains.

    .venv/bin/python benchmarks/history_write.py
    .venv/bin/python benchmarks/history_write.py --backends sqlite --seconds 60
    .venv/bin/python benchmarks/history_write.py --backends memory,sqlite --window 0.05

`memory` (the in-process store) gives the writer's own cost, so the
difference is what the SQL store adds per record; `--window` sets the batch
window (default: the server's). SQL stores write as the server does by
default, through the history writer process (`--writer thread`: on a thread
of this process); that process's CPU per record is reported on its own line.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import cpu_seconds
from history_records import PostgresServer, records

from trunkline.runtime.history import HistoryWriter
from trunkline.stores import HistoryStore, JobFilter, JobRecord, MemoryHistory
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory

TARGET_RATE = 1000.0
WINDOW_S = 1.0


class Timed:
    """A store wrapper noting, per record, the time from `put` to committed."""

    def __init__(self, inner: HistoryStore) -> None:
        self.inner = inner
        self.put_at: dict[str, float] = {}
        self.lags: list[float] = []
        self.batches = 0
        self.backend = getattr(inner, "backend", "?")

    async def add(self, batch: Sequence[JobRecord]) -> None:
        await self.inner.add(batch)
        now = time.perf_counter()
        self.batches += 1
        for r in batch:
            t = self.put_at.pop(r.job_id, None)
            if t is not None:
                self.lags.append(now - t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def child_cpu_s(store: Timed) -> float:
    """CPU seconds of the store's writer process so far (0 without one)."""
    pid = getattr(store.inner, "pid", None)
    return 0.0 if pid is None else cpu_seconds(pid)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))] if s else float("nan")


async def sustained(
    store: Timed, rate: float, seconds: float, first: int, window: float | None
) -> dict[str, Any]:
    kw = {} if window is None else {"batch_window_s": window}
    writer = HistoryWriter(store, **kw)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    writer.start(loop)
    n = int(rate * seconds)
    data = list(records(n, first=first))
    tick = 0.01
    per_tick = rate * tick
    t0 = loop.time() + 0.05
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    child0 = child_cpu_s(store)
    put = 0
    max_pending = 0
    k = 0
    while put < n:
        k += 1
        due = min(n, int(k * per_tick))
        while put < due:
            r = data[put]
            store.put_at[r.job_id] = time.perf_counter()
            writer.put(r)
            put += 1
        max_pending = max(max_pending, writer.pending)
        await asyncio.sleep(max(0.0, t0 + k * tick - loop.time()))  # the next tick
    elapsed_put = loop.time() - t0
    while writer.pending:  # noqa: ASYNC110 - polling the writer is the measurement
        await asyncio.sleep(0.005)
    elapsed = loop.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    user, sys_ = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    child = child_cpu_s(store) - child0
    await writer.aclose()
    return {
        "records": n,
        "rate_put": n / elapsed_put,
        "rate_written": writer.written / elapsed,
        "lag_ms": {
            k: v * 1e3
            for k, v in (
                ("p50", pct(store.lags, 50)),
                ("p99", pct(store.lags, 99)),
                ("max", max(store.lags)),
            )
        },
        "max_pending": max_pending,
        "dropped": writer.dropped,
        "batches": store.batches,
        "cpu_us_per_record": (user + sys_) / n * 1e6,
        "user_us_per_record": user / n * 1e6,
        "sys_us_per_record": sys_ / n * 1e6,
        "writer_process_us_per_record": child / n * 1e6,
    }


async def headroom(store: Timed, n: int, first: int) -> dict[str, Any]:
    writer = HistoryWriter(store, max_pending=n + 1)  # type: ignore[arg-type]
    data = list(records(n, first=first))
    writer.start(asyncio.get_running_loop())
    t0 = time.perf_counter()
    for r in data:
        writer.put(r)
    while writer.pending:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t0
    await writer.aclose()
    return {"records": n, "seconds": dt, "rate": n / dt, "batches": store.batches}


async def bench(name: str, store: HistoryStore, args: argparse.Namespace) -> dict[str, Any]:
    await store.open()
    try:
        timed = Timed(store)
        a = await sustained(timed, args.rate, args.seconds, first=0, window=args.window)
        lag = a["lag_ms"]
        print(f"\n[{name}] (a) sustained {args.rate:,.0f} records/s for {args.seconds:.0f} s")
        print(
            f"  written {a['rate_written']:,.0f}/s (put {a['rate_put']:,.0f}/s) in "
            f"{a['batches']} batches; shed {a['dropped']}; most pending {a['max_pending']}"
        )
        print(
            f"  put -> committed: p50 {lag['p50']:.2f} ms  p99 {lag['p99']:.2f} ms  "
            f"max {lag['max']:.2f} ms"
        )
        print(
            f"  process CPU per record: {a['cpu_us_per_record']:.0f} us "
            f"(user {a['user_us_per_record']:.0f}, system {a['sys_us_per_record']:.0f})"
        )
        if getattr(store, "pid", None) is not None:
            print(
                "  history writer process CPU per record: "
                f"{a['writer_process_us_per_record']:.0f} us"
            )
        ok = (
            a["rate_written"] >= 0.97 * TARGET_RATE
            and a["dropped"] == 0
            and lag["p99"] < WINDOW_S * 1e3
        )
        print(f"  {'PASS' if ok else 'FAIL'}: {TARGET_RATE:,.0f}/s held, none shed, p99 lag < 1 s")
        b = await headroom(Timed(store), args.headroom, first=10_000_000)
        print(
            f"[{name}] (b) headroom: {b['records']:,} records at once committed in "
            f"{b['seconds']:.2f} s = {b['rate']:,.0f} records/s ({b['batches']} batches)"
        )
        total = await store.count(JobFilter())
        print(f"  records in the store: {total:,}")
        return {"sustained": a, "headroom": b, "pass": ok}
    finally:
        await store.close()


def sql(args: argparse.Namespace, store: SqliteHistory | PostgresHistory) -> HistoryStore:
    """`store` written as `--writer` says."""
    return store if args.writer == "thread" else OffloadedStore(store)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if backend == "memory":
            out["memory"] = await bench("memory", MemoryHistory(10_000_000), args)
        elif backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="trunkline-hist-"))
            path = tmp / "history.sqlite3"
            out["sqlite"] = await bench(f"SQLite {path}", sql(args, SqliteHistory(path)), args)
            size = sum(f.stat().st_size for f in tmp.iterdir())  # noqa: ASYNC240
            print(f"  files: {size / 1e6:.1f} MB")
        elif backend == "postgresql":
            if args.postgres_url:
                out["postgresql"] = await bench(
                    "PostgreSQL", sql(args, PostgresHistory(args.postgres_url)), args
                )
            else:
                pg = PostgresServer(durable=True)
                await asyncio.to_thread(pg.start)
                try:
                    out["postgresql"] = await bench(
                        "PostgreSQL (local, fsync on)", sql(args, PostgresHistory(pg.url())), args
                    )
                finally:
                    await asyncio.to_thread(pg.stop)
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--rate", type=float, default=TARGET_RATE)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--headroom", type=int, default=50_000)
    p.add_argument("--window", type=float, help="the writer's batch window, s")
    p.add_argument(
        "--writer",
        choices=("process", "thread"),
        default="process",
        help="SQL stores' writes in the history writer process (default) or a thread",
    )
    p.add_argument("--postgres-url", help="an existing database instead of a throwaway cluster")
    args = p.parse_args(argv)
    out = asyncio.run(run(args))
    ok = all(v["pass"] for v in out.values())
    print(f"\n{'PASS' if ok else 'FAIL'}: history write targets")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
