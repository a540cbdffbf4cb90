"""The history in a running server: SQLite by default in the data directory,
records that survive a restart, /healthz and /metrics blocks, a clear stop
at start for an unusable store, and a degradation (seen, counted, recovered)
when the store fails while serving, with dispatch going on meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from server.helpers import Srv
from stores.pgserver import PostgresServer
from support import KEY, SECRET, ServerProcess, free_port, wait_until

import trunkline.server.app as app_module
from trunkline.config import Config, parse_config
from trunkline.stores import HistoryStore, JobFilter, StoreError, create_store
from trunkline.stores.factory import SQLITE_FILE
from trunkline.stores.offload import OffloadedStore
from trunkline.stores.postgres import PostgresHistory
from trunkline.stores.sqlite import SqliteHistory


def config(**sections: Any) -> Config:
    return parse_config({"keys": {KEY: SECRET}, **sections})


@asynccontextmanager
async def serving(cfg: Config) -> AsyncIterator[Srv]:
    ts = TestServer(app_module.build_app(cfg), host="127.0.0.1")
    await ts.start_server()
    srv = Srv(ts)
    try:
        yield srv
    finally:
        await srv.close()


async def health(srv: Srv) -> dict[str, Any]:
    status, body = await srv.call("GET", "/healthz", headers={})
    assert status == 200
    history: dict[str, Any] = body["history"]
    return history


async def metric(srv: Srv, name: str) -> float:
    async with srv.session.get(srv.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


async def refused(srv: Srv, n: int, pool: str = "nobody") -> list[str]:
    """`n` jobs that end at once (no worker, no wait): n ended records."""
    return [(await srv.dispatch(pool, max_wait_s=0))["job_id"] for _ in range(n)]


def capture_store(monkeypatch: pytest.MonkeyPatch) -> list[HistoryStore]:
    """The stores build_app creates, for tests that break them underneath."""
    made: list[HistoryStore] = []

    def create(cfg: Config) -> HistoryStore:
        made.append(create_store(cfg))
        return made[-1]

    monkeypatch.setattr(app_module, "create_store", create)
    return made


# --------------------------------------------------------------- the default


async def test_sqlite_in_the_data_dir_is_the_default(tmp_path: Path) -> None:
    """With no [store] section the server keeps its history in
    <data_dir>/history.sqlite3; /healthz and /metrics show it writing."""
    data = tmp_path / "data"
    async with serving(config(server={"data_dir": str(data)})) as srv:
        ids = await refused(srv, 3)
        await wait_until(lambda: srv.dispatcher.history_status().written == 3, what="written")
        h = await health(srv)
        assert (h["backend"], h["state"], h["written"], h["pending"]) == ("sqlite", "ok", 3, 0)
        assert await metric(srv, "trunkline_history_written_total") == 3
        assert await metric(srv, "trunkline_history_degraded") == 0
    assert (data / "history.sqlite3").is_file()
    store = SqliteHistory(data / "history.sqlite3")
    await store.open()
    assert {r.job_id for r in (await store.query(JobFilter(), limit=10)).records} == set(ids)
    await store.close()


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    """Ended jobs, traces included, are served after a clean restart on the
    same data directory, by id and in the job list."""
    cfg = config(server={"data_dir": str(tmp_path)})
    async with serving(cfg) as srv:
        ids = await refused(srv, 4)
        before = await srv.job(ids[0])
    async with serving(cfg) as srv:
        after = await srv.job(ids[0])
        assert after == before
        assert after["trace"], "the trace is kept"
        status, body = await srv.call("GET", "/v1/jobs?state=no_capacity&limit=10")
        assert status == 200
        assert {j["job_id"] for j in body["jobs"]} == set(ids)


async def test_memory_backend_keeps_nothing_on_disk(tmp_path: Path) -> None:
    """backend = "memory" writes no file and forgets on restart."""
    cfg = config(server={"data_dir": str(tmp_path / "d")}, store={"backend": "memory"})
    async with serving(cfg) as srv:
        (job_id,) = await refused(srv, 1)
        assert (await health(srv))["backend"] == "memory"
        assert (await srv.job(job_id))["state"] == "no_capacity"
    assert not (tmp_path / "d").exists()
    async with serving(cfg) as srv:
        status, _ = await srv.call("GET", f"/v1/jobs/{job_id}")
        assert status == 404


# ------------------------------------------------------- refused at start


async def test_corrupt_history_stops_the_start(tmp_path: Path) -> None:
    """A damaged history file stops the server at start with StoreError (the
    port never opens); the file is left for the operator."""
    (tmp_path / "history.sqlite3").write_bytes(b"\x00garbage" * 1000)
    ts = TestServer(app_module.build_app(config(server={"data_dir": str(tmp_path)})))
    with pytest.raises(StoreError, match="is unreadable"):
        await ts.start_server()
    await ts.close()


def test_serve_exits_with_the_reason(tmp_path: Path) -> None:
    """`trunkline serve` on a data directory it cannot use exits 1 with one
    line naming the path and the fix, not a traceback."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    proc = ServerProcess(tmp_path)
    proc.config.write_text(
        proc.config.read_text().replace("[server]\n", f'[server]\ndata_dir = "{blocker}"\n')
    )
    with pytest.raises(RuntimeError, match="server exited"):
        proc.start()
    assert proc.proc is not None
    assert proc.proc.wait(10) == 1
    log = proc.log.read_text()
    assert f"trunkline: job history: cannot create the data directory {blocker}" in log
    assert "Traceback" not in log


async def test_unreachable_postgres_stops_the_start() -> None:
    """[store] url naming a PostgreSQL that is not there stops the start,
    within the connect timeout, naming the URL without its password."""
    url = f"postgresql://trunkline:pw123@127.0.0.1:{free_port()}/trunkline"
    ts = TestServer(app_module.build_app(config(store={"url": url})))
    with pytest.raises(StoreError, match=r"cannot connect .*trunkline:\*\*\*@127\.0\.0\.1") as e:
        await asyncio.wait_for(ts.start_server(), 20.0)
    assert "pw123" not in str(e.value)
    await ts.close()


# ------------------------------------------------------- failing later


async def test_full_disk_degrades_and_dispatch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite file stops growing (disk full) while serving: /healthz says
    degraded and why, /metrics counts it, ended jobs stay readable from
    memory, a worker keeps getting jobs; with room again the backlog is
    written and the history is ok. (Writes in a server thread, where the
    test can cap the writer's connection; the writer process's failures
    come back through the same path: test_writer_process_crash_...)"""
    made = capture_store(monkeypatch)
    cfg = config(server={"data_dir": str(tmp_path)}, store={"writer": "thread"})
    async with serving(cfg) as srv:
        (store,) = made
        assert isinstance(store, SqliteHistory)
        await refused(srv, 1)
        await wait_until(lambda: srv.dispatcher.history_status().written == 1, what="first")

        def cap(pages: int | None) -> None:
            db = store._w.conn()
            n = db.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
            db.execute(f"PRAGMA max_page_count = {n}")

        await store._w.run(cap, None)
        ids = await refused(srv, 60)
        await wait_until(lambda: srv.dispatcher.history_status().degraded, what="degraded")
        h = await health(srv)
        assert h["state"] == "degraded"
        assert "full" in h["reason"]
        assert await metric(srv, "trunkline_history_degraded") == 1
        assert await metric(srv, "trunkline_history_write_errors_total") >= 1
        assert (await srv.job(ids[-1]))["state"] == "no_capacity"  # from memory
        # a bystander: a worker still gets, runs and ends a job
        w = await srv.connect("support")
        job = await srv.dispatch("support", max_wait_s=5)
        await w.accept(job["job_id"])
        await w.next_assignment()
        await w.succeed(job["job_id"])
        await wait_until(
            lambda: srv.dispatcher.live_job(job["job_id"]) is None, what="bystander job ended"
        )
        await store._w.run(cap, 1_000_000)
        await wait_until(
            lambda: srv.dispatcher.history_status().written == 62, within=30.0, what="backlog"
        )
        h = await health(srv)
        assert (h["state"], h["pending"], h["reason"]) == ("ok", 0, "")
        assert await metric(srv, "trunkline_history_degraded") == 0


async def test_writer_process_crash_degrades_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history writer process dies (killed) while serving: the records
    it had not acknowledged stay pending, /healthz says degraded and names
    its exit, dispatch goes on; the retry starts a new writer process and
    every record reaches the file."""
    made = capture_store(monkeypatch)
    async with serving(config(server={"data_dir": str(tmp_path)})) as srv:
        (store,) = made
        assert isinstance(store, OffloadedStore)
        first = await refused(srv, 3)
        await wait_until(lambda: srv.dispatcher.history_status().written == 3, what="first")
        pid = store.pid
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()  # noqa: ASYNC240 - procfs
        assert str(tmp_path).encode() not in argv  # the path comes through the pipe
        os.kill(pid, signal.SIGSTOP)  # it cannot acknowledge the next batch...
        during = await refused(srv, 20)
        await wait_until(lambda: store.in_flight == 1, what="the batch sent")
        assert srv.dispatcher.history_status().pending == 20
        os.kill(pid, signal.SIGKILL)  # ...and dies without writing it
        await wait_until(lambda: srv.dispatcher.history_status().degraded, what="degraded")
        h = await health(srv)
        assert h["state"] == "degraded"
        assert "history writer process exited (code -9)" in h["reason"]
        assert (await srv.job(during[0]))["state"] == "no_capacity"  # from memory
        await wait_until(
            lambda: srv.dispatcher.history_status().written == 23, within=30.0, what="rewritten"
        )
        assert store.pid not in (None, pid)
        assert (await health(srv))["state"] == "ok"
        for job_id in first + during:
            assert (await srv.job(job_id))["state"] == "no_capacity"
    fresh = SqliteHistory(tmp_path / SQLITE_FILE)
    await fresh.open()
    try:
        assert await fresh.count(JobFilter()) == 23
    finally:
        await fresh.close()


async def test_postgres_going_away_degrades_and_recovers() -> None:
    """The PostgreSQL server stops while trunkline serves: dispatch goes on,
    the history is degraded (and says so); PostgreSQL back, every record
    ended meanwhile reaches it."""
    with PostgresServer(durable=True) as pg:  # halt is a crash: commits must be on disk
        async with serving(config(store={"url": pg.url()})) as srv:
            first = await refused(srv, 2)
            await wait_until(lambda: srv.dispatcher.history_status().written == 2, what="written")
            await asyncio.to_thread(pg.halt)
            during = await refused(srv, 5)
            await wait_until(
                lambda: srv.dispatcher.history_status().degraded, within=30.0, what="degraded"
            )
            assert (await health(srv))["state"] == "degraded"
            assert (await srv.job(during[0]))["state"] == "no_capacity"
            await asyncio.to_thread(pg.start)
            await wait_until(
                lambda: srv.dispatcher.history_status().written == 7, within=60.0, what="recovery"
            )
            assert (await health(srv))["state"] == "ok"
        store = PostgresHistory(pg.url())
        await store.open()
        try:
            for job_id in first + during:
                assert await store.get(job_id) is not None, job_id
        finally:
            await store.close()
