"""GET /v1/jobs over the history: every filter, cursor pagination across the
live and ended parts (and across a restart), 400s that name the parameter,
room scope, and the CSV / JSON lines export streamed through all pages."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from server.conftest import MakeServer
from server.helpers import Srv
from support import KEY, SECRET

import trunkline.server.job_export as job_export


async def ids(srv: Srv, query: str) -> list[str]:
    status, body = await srv.call("GET", "/v1/jobs" + query)
    assert status == 200, body
    return [j["job_id"] for j in body["jobs"]]


async def all_pages(srv: Srv, query: str, limit: int) -> tuple[list[str], int]:
    """Every job id of `query`, following `next_cursor` with pages of `limit`;
    and how many pages that took."""
    out: list[str] = []
    cursor = None
    pages = 0
    sep = "&" if query else ""
    while True:
        q = f"?{query}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = await srv.call("GET", "/v1/jobs" + q)
        assert status == 200, body
        pages += 1
        assert len(body["jobs"]) <= limit
        out += [j["job_id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return out, pages
        assert pages < 100, "the cursor does not advance"


async def refused(srv: Srv, pool: str, n: int, **fields: Any) -> list[str]:
    return [(await srv.dispatch(pool, max_wait_s=0, **fields))["job_id"] for _ in range(n)]


async def test_pages_cover_live_then_ended_each_once(srv: Srv) -> None:
    """Pages of 3 list the live jobs oldest first, then the ended ones newest
    first, each exactly once, and the last page has no next_cursor."""
    ended = await refused(srv, "gone", 7)
    live = [(await srv.dispatch("wait", max_wait_s=30))["job_id"] for _ in range(4)]
    got, pages = await all_pages(srv, "", 3)
    assert got == live + ended[::-1]
    assert pages == 4
    # A page exactly filled by the live jobs still says that ended ones follow.
    got, _ = await all_pages(srv, "state=queued,no_capacity", 4)
    assert got == live + ended[::-1]
    got, pages = await all_pages(srv, "state=queued", 4)
    assert (got, pages) == (live, 1)


async def test_filters(srv: Srv) -> None:
    """state / outcome (lists), pool or agent_name, room, worker and the
    time range select what they name, live and ended alike."""
    w = await srv.connect("a", max_jobs=1, auto="accept", auto_run=True)
    running = (await srv.dispatch("a", wait=True, room="r1"))["job_id"]
    queued = (await srv.dispatch("a", room="r1"))["job_id"]
    t_mid = time.time()
    no_cap = await refused(srv, "b", 3, room="r2")
    assert await ids(srv, "?outcome=no_capacity") == no_cap[::-1]
    assert await ids(srv, "?state=running,queued") == [running, queued]
    assert await ids(srv, "?state=running&outcome=no_capacity") == [running, *no_cap[::-1]]
    assert await ids(srv, "?pool=a") == [running, queued]
    assert await ids(srv, "?agent_name=b&limit=2") == no_cap[:0:-1]
    assert await ids(srv, "?room=r1") == [running, queued]
    assert await ids(srv, f"?worker={w.worker_id}") == [running]
    assert await ids(srv, f"?worker_id={w.worker_id}") == [running]
    assert await ids(srv, f"?since={t_mid}") == no_cap[::-1]
    assert await ids(srv, f"?until={t_mid}") == [running, queued]
    iso = dt.datetime.fromtimestamp(t_mid, dt.UTC).isoformat()
    assert await ids(srv, "?since=" + iso.replace("+00:00", "Z")) == no_cap[::-1]
    assert len(await ids(srv, "?since=1h")) == 5
    assert await ids(srv, "?until=1h") == []
    assert await ids(srv, "?pool=a&room=r2") == []


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("?stat=failed", "unknown parameter(s) ['stat']"),
        ("?state=bogus", "unknown state 'bogus'; allowed:"),
        ("?outcome=succeeded,nope", "unknown outcome 'nope'"),
        ("?since=yesterday", "'since' must be Unix seconds"),
        ("?until=5x", "'until' must be Unix seconds"),
        ("?since=1h&until=2h", "'since' ("),
        ("?limit=1001", "'limit' must be an integer >= 1 and <= 1000"),
        ("?limit=ten", "'limit' must be an integer"),
        ("?cursor=zzz", "malformed cursor"),
        ("?cursor=Lnot-base64!", "malformed cursor"),
        ("?cursor=Eabc", "malformed cursor"),
        ("?format=xml", "unknown format 'xml'; allowed: json, csv, jsonl"),
        ("?room=a&room=b", "'room' given 2 times"),
        ("?pool=a&agent_name=b", "'pool' and 'agent_name'"),
        ("?caller=", "'caller' is empty"),
        ("?trunk=" + "x" * 1025, "'trunk' is longer than 1024"),
        ("?since=1e999", "'since' must be Unix seconds"),
        ("?format=csv&cursor=Lxx", "malformed cursor"),
    ],
)
async def test_bad_parameters_are_named(srv: Srv, query: str, names: str) -> None:
    """A bad parameter is a 400 invalid_argument whose message names it and
    what it allows."""
    status, err = await srv.call("GET", "/v1/jobs" + query)
    assert (status, err["code"]) == (400, "invalid_argument"), err
    assert names in err["message"]


async def test_room_scoped_token_sees_its_room_only(srv: Srv) -> None:
    """A token scoped to a room lists that room's jobs (with or without
    ?room=), and asking for another room is 403."""
    mine = await refused(srv, "p", 2, room="mine")
    await refused(srv, "p", 2, room="other")
    tok = api.AccessToken(KEY, SECRET).with_grants(api.VideoGrants(room_admin=True, room="mine"))
    scoped = {"Authorization": f"Bearer {tok.to_jwt()}"}
    for q in ("", "?room=mine", "?format=jsonl"):
        async with srv.session.get(srv.url + "/v1/jobs" + q, headers=scoped) as r:
            assert r.status == 200
            text = await r.text()
        if q.endswith("jsonl"):
            got = [json.loads(line)["job_id"] for line in text.splitlines()]
        else:
            got = [j["job_id"] for j in json.loads(text)["jobs"]]
        assert got == mine[::-1]
    status, err = await srv.call("GET", "/v1/jobs?room=other", headers=scoped)
    assert (status, err["code"]) == (403, "permission_denied")


async def export(srv: Srv, query: str) -> tuple[str, str]:
    async with srv.session.get(srv.url + "/v1/jobs?" + query, headers=srv.auth) as r:
        assert r.status == 200, await r.text()
        return r.headers["Content-Type"], await r.text()


async def test_csv_and_jsonl_export_stream_every_page(
    srv: Srv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """format=csv streams a header row and one row per job through every page
    (live ones first), in the documented columns with no trace; jsonl the
    same jobs with their traces; `limit` caps an export."""
    monkeypatch.setattr(job_export, "PAGE", 4)  # many pages from a few jobs
    monkeypatch.setattr(job_export, "SLICE", 3)  # and pages written in slices
    ended = await refused(srv, "x", 10, metadata="=cmd|' /C calc'!A0")
    live = (await srv.dispatch("y", max_wait_s=30))["job_id"]
    ctype, text = await export(srv, "format=csv")
    assert ctype.startswith("text/csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == job_export.CSV_COLUMNS
    assert "trace" not in rows[0]
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert [r["job_id"] for r in body] == [live, *ended[::-1]]
    first = body[1]
    assert first["state"] == "no_capacity"
    assert first["agent_name"] == "x"
    assert float(first["ended_at"]) >= float(first["created_at"])
    assert first["worker_id"] == ""
    assert first["sip_call_id"] == ""
    assert first["metadata"].startswith("'="), "a formula is defused"

    ctype, text = await export(srv, "format=jsonl&outcome=no_capacity")
    assert ctype.startswith("application/x-ndjson")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [j["job_id"] for j in lines] == ended[::-1]
    assert all(j["trace"] and j["trace"][0]["event"] == "requested" for j in lines)

    _, text = await export(srv, "format=jsonl&limit=6")
    assert [json.loads(line)["job_id"] for line in text.splitlines()] == [live, *ended[:4:-1]]
    _, text = await export(srv, "format=csv&pool=nobody")
    assert list(csv.reader(io.StringIO(text))) == [list(job_export.CSV_COLUMNS)]


async def test_cursor_and_job_survive_a_restart(make_server: MakeServer, tmp_path: Path) -> None:
    """With SQLite history, a next_cursor taken before a restart continues
    the listing after it, and GET /v1/jobs/{id} serves the ended job (trace
    included) from the store."""
    cfg = {"server": {"data_dir": str(tmp_path)}}
    srv = await make_server(cfg)
    jobs = await refused(srv, "p", 5)
    status, body = await srv.call("GET", "/v1/jobs?limit=2")
    assert status == 200
    assert [j["job_id"] for j in body["jobs"]] == jobs[:2:-1]
    cursor = body["next_cursor"]
    before = await srv.job(jobs[0])
    await srv.close()

    srv = await make_server(cfg)
    assert srv.dispatcher.live_job_count() == 0
    status, body = await srv.call("GET", f"/v1/jobs?limit=10&cursor={cursor}")
    assert status == 200
    assert [j["job_id"] for j in body["jobs"]] == jobs[2::-1]
    assert body["next_cursor"] is None
    after = await srv.job(jobs[0])
    assert after == before
    assert next(e["event"] for e in after["trace"]) == "requested"
