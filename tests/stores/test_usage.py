"""Scale events and the usage report outside the store contract: refusal
kinds match the reasons the scheduler writes, the writer carries scale events
off the hot path (readable at once, shed and counted when full, written out
at shutdown), the autoscaler's decisions reach the store, a schema-2 history
is migrated and reported, and `GET /v1/usage` / `trunkline usage` answer
(400 naming a bad parameter) across a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from livekit import api
from protoworker import ProtoWorker
from stores.contract_usage import HOUR, T0, call, events
from support import KEY, SECRET, wait_until

from trunkline.auth import admin_token
from trunkline.config import parse_config
from trunkline.core import reasons
from trunkline.providers.fake import FakeBackend, FakeProvider
from trunkline.runtime.autoscaler import AutoscaleController
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.history import HistoryWriter
from trunkline.runtime.metrics import Metrics
from trunkline.stores import MemoryHistory, StoreError
from trunkline.stores._schema import LATEST
from trunkline.stores.sqlite import SqliteHistory
from trunkline.stores.usage import ScaleEventRecord, refusal_kind

from .test_server_history import config, refused, serving


def _pool(**kw: Any) -> Any:
    cfg = SimpleNamespace(max_concurrent_jobs=4, max_queued=9)
    base = {"name": "p", "workers": {}, "queued": 0, "config": cfg, "quota_full": lambda: False}
    return SimpleNamespace(**{**base, **kw})


def test_refusal_kinds_match_the_schedulers_reasons() -> None:
    """Each reason trunkline.core.reasons words maps to its kind (a reworded
    reason fails here, not silently in reports)."""
    job = SimpleNamespace(queued_since=None, queue_wait_s=5.0, max_wait_s=5.0)
    cases = [
        (reasons.no_capacity(_pool(quota_full=lambda: True), job, 0.0), "quota"),  # type: ignore[arg-type]
        (reasons.no_capacity(_pool(), job, 0.0), "no_workers"),  # type: ignore[arg-type]
        (reasons.no_capacity(_pool(workers={"w": 1}), job, 0.0), "no_free_slot"),  # type: ignore[arg-type]
        (reasons.queue_full(_pool(queued=9), 9, 100), "queue_full"),  # type: ignore[arg-type]
        (reasons.queue_full(_pool(queued=1), 100, 100), "queue_full"),  # type: ignore[arg-type]
    ]
    for reason, kind in cases:
        assert refusal_kind("no_capacity", reason) == kind, reason
    assert refusal_kind("no_capacity", "something new") == "other"
    assert refusal_kind("rejected", "worker W rejected the job") == "rejected"
    assert refusal_kind("succeeded", "") is None
    assert refusal_kind("failed", "has no worker registered") is None


def _event(n: int, pool: str = "p") -> ScaleEventRecord:
    return dataclasses.replace(events(1)[0], event_id=f"X{n}", at=T0 + n, pool=pool)


async def test_writer_keeps_scale_events_off_the_hot_path() -> None:
    """A scale event put is readable at once, written by the writer task,
    shed and counted (not blocking) when the writer is full, and written out
    at shutdown."""
    store = MemoryHistory()
    w = HistoryWriter(store, max_pending=3, batch_window_s=0.0)
    await w.open()
    w.put_scale_event(_event(1))
    assert [e.event_id for e in await w.scale_events()] == ["X1"]  # before the writer ran
    w.start(asyncio.get_running_loop())
    await wait_until(lambda: store.scale_events(), what="event stored")
    await w.aclose()
    w2 = HistoryWriter(store, max_pending=2)
    for n in range(2, 6):
        w2.put_scale_event(_event(n))
    assert w2.dropped == 2
    await w2.aclose()  # never started: shutdown writes what is pending
    assert [e.event_id for e in await store.scale_events()] == ["X3", "X2", "X1"]


async def test_writer_answers_scale_events_from_memory_while_the_store_fails() -> None:
    """While the store fails, pending events are still listed and a usage
    report raises StoreError (the API's 503), counted as a degradation."""

    class Down(MemoryHistory):
        async def scale_events(self, **kw: Any) -> tuple[ScaleEventRecord, ...]:
            raise OSError("disk gone")

        async def usage(self, **kw: Any) -> Any:
            raise OSError("disk gone")

    w = HistoryWriter(Down())
    w.put_scale_event(_event(7))
    assert [e.event_id for e in await w.scale_events(pool="p")] == ["X7"]
    with pytest.raises(StoreError):
        await w.usage(since=T0, until=T0 + HOUR, bucket="hour")
    assert w.degraded


async def test_autoscaler_decisions_are_kept_in_the_history() -> None:
    """The scale-up that starts a pool's minimum reaches the store as a record
    with the replicas before and after and what triggered it."""
    cfg = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {"p": {"command": ["agent"], "max_jobs_per_worker": 2, "min_replicas": 2}},
        }
    )
    store = MemoryHistory()
    d = Dispatcher(cfg, Metrics(), history=store)
    await d.open_history()
    d.start(asyncio.get_running_loop())
    ctl = AutoscaleController(
        d, cfg.replica_pools, {"local": FakeProvider(FakeBackend())}, url="ws://x",
        api_key="k", api_secret="s",
    )  # fmt: skip
    await ctl.start()
    try:
        got = await wait_until(lambda: store.scale_events(pool="p"), what="scale event stored")
        up = got[-1]
        assert (up.kind, up.from_replicas, up.to_replicas, up.desired) == ("up", 0, 2, 2)
        assert up.reason
        assert len(up.replicas) == 2
        assert abs(up.at - time.time()) < 60
        rows = await d.usage(since=up.at - 1, until=up.at + 1, bucket="hour")
        assert [(r.pool, dict(r.scale_events)) for r in rows] == [("p", {"up": 1})]
    finally:
        await ctl.close(0.1)
        d.close()
        await d.aclose()


def _add_v2(store: SqliteHistory, records: list[Any]) -> None:
    """Insert as a schema-2 server did: jobs and their spans, no usage cache."""
    from trunkline.stores import _sql

    rows = [_sql.to_row(r) for r in records]
    db = store._w.conn()
    marks = ", ".join("?" for _ in _sql.COLUMNS)
    db.executemany(f"INSERT INTO trunkline_jobs ({_sql.SELECT_COLUMNS}) VALUES ({marks})", rows)
    db.execute("UPDATE trunkline_job_spans SET lo = min(lo, ?), hi = max(hi, ?)", _sql.spans(rows))


async def test_a_schema_2_history_is_migrated_and_reported(tmp_path: Path) -> None:
    """Records written under schema 2 are in the usage report once the store
    is opened by this version (the cache starts empty and fills from them)."""
    path = tmp_path / "h.sqlite3"
    old = SqliteHistory(path, schema_version=2)
    await old.open()
    recs = [
        call(1, "p", T0, serve=(T0 + 1, T0 + 61)).record,
        call(2, "p", T0 + 5, refused="quota").record,
    ]
    await old.run_read(lambda: None)  # opened
    await old._w.run(_add_v2, old, recs)
    await old.close()
    new = SqliteHistory(path)
    await new.open()
    try:
        (row,) = await new.usage(since=T0, until=T0 + 1, bucket="hour")
        assert (row.requested, row.placed, dict(row.refused), row.peak_concurrent) == (
            2, 1, {"quota": 1}, 1,
        )  # fmt: skip
        assert row.agent_minutes == pytest.approx(1.0)
        await new.add_scale_events([_event(1)])
        assert len(await new.scale_events()) == 1
    finally:
        await new.close()


async def test_usage_api_and_cli_across_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A served call and a refused one show in /v1/usage (per pool, hour and
    day), the same after a restart on the same data directory; `trunkline
    usage` prints them and --json the server's report."""
    cfg = config(server={"data_dir": str(tmp_path)}, pools={"support": {"max_jobs_per_worker": 1}})
    async with serving(cfg) as srv:
        w = ProtoWorker.autonomous(srv.url, "support", max_jobs=1)
        srv.workers.append(w)
        await w.connect()
        job = await srv.dispatch("support", wait=True)
        assert job["state"] == "running"
        await w.succeed(job["job_id"])
        await refused(srv, 2)
        await wait_until(lambda: srv.dispatcher.history_status().written == 3, what="written")
        status, first = await srv.call("GET", "/v1/usage?since=1h")
        assert status == 200, first
        by_pool = {r["pool"]: r for r in first["rows"]}
        assert by_pool["support"]["requested"] == 1
        assert by_pool["support"]["placed"] == 1
        assert by_pool["support"]["peak_concurrent"] == 1
        assert by_pool["support"]["agent_minutes"] > 0
        assert by_pool["nobody"]["refused"] == {"no_workers": 2}
        assert by_pool["nobody"]["queue_wait_s"]["max"] == 0
        status, day = await srv.call("GET", "/v1/usage?bucket=day&since=1d&pool=nobody")
        assert status == 200
        assert [r["pool"] for r in day["rows"]] == ["nobody"]
        assert day["rows"][0]["end"] - day["rows"][0]["start"] == 86_400
    async with serving(cfg) as srv:
        status, again = await srv.call(
            "GET", f"/v1/usage?since={first['since']}&until={first['until']}"
        )
        assert status == 200
        assert again["rows"] == first["rows"]
        from trunkline.cli import main

        args = ["usage", "--url", srv.url, "--api-key", KEY, "--api-secret", SECRET]
        assert await asyncio.to_thread(main, [*args, "--since", "1h"]) == 0
        out = capsys.readouterr().out
        for text in ("support", "nobody", "no_workers 2"):
            assert text in out
        assert await asyncio.to_thread(main, [*args, "--since", "1h", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == first["rows"]
        assert await asyncio.to_thread(main, [*args, "--since", "yesterday"]) == 2
        assert "'since'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("bucket=week", "'bucket'"),
        ("since=soon", "'since'"),
        ("until=later", "'until'"),
        ("since=1h&until=2h", "'since'"),
        ("since=200d&bucket=hour", "'bucket'"),
        ("pool=a&agent_name=b", "'pool'"),
        ("events=-1", "'events'"),
        ("events=x", "'events'"),
        ("bucket=hour&bucket=day", "'bucket'"),
        ("stat=failed", "unknown parameter"),
        ("pool=", "'pool'"),
    ],
)
async def test_usage_bad_parameters_are_400_naming_them(query: str, names: str) -> None:
    """Each bad parameter answers 400 invalid_argument with its name."""
    async with serving(config(store={"backend": "memory"})) as srv:
        status, body = await srv.call("GET", "/v1/usage?" + query)
        assert status == 400, body
        assert body["code"] == "invalid_argument"
        assert names in body["message"]


async def test_usage_needs_a_cluster_wide_reader() -> None:
    """No token: 401; a token scoped to one room: 403 (the report spans
    every room); an admin token with the events list: 200."""
    async with serving(config(store={"backend": "memory"})) as srv:
        status, _ = await srv.call("GET", "/v1/usage", headers={})
        assert status == 401
        tok = api.AccessToken(KEY, SECRET).with_grants(api.VideoGrants(room_admin=True, room="r1"))
        scoped = {"Authorization": f"Bearer {tok.to_jwt()}"}
        status, _ = await srv.call("GET", "/v1/usage", headers=scoped)
        assert status == 403
        auth = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
        status, body = await srv.call("GET", "/v1/usage?events=5", headers=auth)
        assert status == 200
        assert body["rows"] == []
        assert body["scale_events"] == []


async def test_retention_task_warms_the_usage_cache(tmp_path: Path) -> None:
    """At start the background task fills the usage cache day by day, newest
    first, so the first report over the kept window is read, not computed
    (here: every hour and day bucket of the records' days is marked)."""
    from trunkline.runtime.retention import DAY_S, Retention

    store = SqliteHistory(tmp_path / "h.sqlite3")
    await store.open()
    try:
        await store.add(
            [
                call(n, "p", T0 - n * 5000, serve=(T0 - n * 5000, T0 - n * 5000 + 60)).record
                for n in range(20)
            ]
        )
        ret = Retention(store, retention_days=0, max_records=0, clock=lambda: T0 + 10)
        assert await ret.warm_usage(3) == 3

        def marks() -> list[tuple[int, int]]:
            db = store._r.conn()
            return db.execute(
                "SELECT width, count(*) FROM trunkline_usage_done GROUP BY width ORDER BY width"
            ).fetchall()

        assert await store.run_read(marks) == [(3600, 72), (int(DAY_S), 3)]
        ret.start(asyncio.get_running_loop())  # both bounds off: it still warms
        await ret.wait_run()
        await ret.aclose()
    finally:
        await store.close()


async def test_a_usage_cache_of_an_earlier_shape_is_rebuilt(tmp_path: Path) -> None:
    """A history at version 4 whose usage cache has the shape version 3 had
    while it was developed (no scale events, no waits) opens at the latest
    version with the cache rebuilt, and reports from its records."""
    path = tmp_path / "h.sqlite3"
    old = SqliteHistory(path, schema_version=4)
    await old.open()
    await old.add([call(1, "p", T0, serve=(T0 + 1, T0 + 61)).record])

    def old_shape() -> None:
        db = old._w.conn()
        db.execute("DROP TABLE trunkline_usage")
        db.execute(
            "CREATE TABLE trunkline_usage (width INTEGER, bucket_start REAL, pool TEXT,"
            " requested INTEGER, placed INTEGER, refused TEXT, agent_minutes REAL, peak INTEGER,"
            " wait_p50 REAL, wait_p95 REAL, wait_max REAL, PRIMARY KEY (width, bucket_start, pool))"
        )

    await old._w.run(old_shape)
    await old.close()
    new = SqliteHistory(path)
    await new.open()
    try:
        assert await new.schema() == LATEST
        (row,) = await new.usage(since=T0, until=T0 + 1, bucket="day")
        assert (row.requested, row.peak_concurrent) == (1, 1)
    finally:
        await new.close()
