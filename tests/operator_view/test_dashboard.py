"""The dashboard: access control and the event stream over HTTP, then the page
itself in headless Chromium (Debian's `chromium`, driven by Playwright)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from operator_view import browser
from protoworker import ProtoWorker
from support import KEY, SECRET, ServerProcess, server_process, wait_until

from trunkline.auth import admin_token, agent_token, viewer_token

STATIC = Path(__file__).parents[2] / "src/trunkline/server/static"
CONFIG = """
[pools.support]
max_jobs_per_worker = 2
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from server_process(tmp_path_factory.mktemp("dashboard"), CONFIG)


async def read_events(resp: aiohttp.ClientResponse, want: int) -> list[tuple[str, Any]]:
    """The first `want` server-sent events of a stream, decoded."""
    events: list[tuple[str, Any]] = []
    name = ""
    while len(events) < want:
        raw = await resp.content.readline()
        assert raw, "stream ended early"
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


async def test_dashboard_needs_a_read_token(server: ServerProcess) -> None:
    """Without a token the page and the feed answer 401 naming the fix; a worker's
    token (no roomAdmin/roomList grant) gets 403."""
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/") as r:
            assert r.status == 401
            assert "trunkline status --dashboard-url" in await r.text()
        async with s.get(server.url + "/dashboard/stream") as r:
            assert r.status == 401
            assert (await r.json())["code"] == "unauthenticated"
        bad = {"Authorization": f"Bearer {agent_token(KEY, SECRET)}"}
        async with s.get(server.url + "/dashboard/jobs/x", headers=bad) as r:
            assert r.status == 403


async def test_token_link_sets_a_cookie_and_strips_the_token(server: ServerProcess) -> None:
    """`/?token=` answers 303 to `/` with an HttpOnly SameSite cookie; the page then
    loads with a CSP that allows only this origin."""
    # unsafe=True: aiohttp's jar otherwise ignores cookies set by an IP address.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        url = f"{server.url}/?token={admin_token(KEY, SECRET)}"
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/"
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=Strict" in cookie
        async with s.get(url) as r:  # follows the redirect with the cookie
            assert r.status == 200
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert "dashboard.js" in await r.text()


async def test_stream_sends_history_and_snapshots(
    server: ServerProcess, workers: list[ProtoWorker]
) -> None:
    """The feed opens with the time series and a snapshot, then a new snapshot when a
    worker registers."""
    headers = {"Authorization": f"Bearer {admin_token(KEY, SECRET)}"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(server.url + "/dashboard/stream", headers=headers) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        (h, history), (k, snap) = await read_events(r, 2)
        assert (h, k) == ("history", "snapshot")
        assert isinstance(history, list)
        assert {p["agent_name"] for p in snap["pools"]} >= {"support"}
        w = ProtoWorker.autonomous(server.ws_url, "support", max_jobs=2)
        workers.append(w)
        await w.connect()
        for _ in range(200):  # bounded: events come every 0.5 s at least
            name, data = (await read_events(r, 1))[0]
            if name == "snapshot" and any(x["worker_id"] == w.worker_id for x in data["workers"]):
                break
        else:
            raise AssertionError("no snapshot showed the new worker")


def test_static_files_reference_nothing_outside_the_machine() -> None:
    """The page's files load no URL with a scheme or host (no CDN, no fonts)."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name


@pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")
async def test_browser_shows_workers_slots_and_traces_live(
    server: ServerProcess, workers: list[ProtoWorker]
) -> None:
    """In Chromium: the page loads, a registering worker appears, its slot bar fills
    when a job starts and empties when it ends (no reload), and clicking the job
    opens its trace timeline with the offer and its answer."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await browser.launch(pw)
        try:
            page = await chromium.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            outside: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on(
                "request",
                lambda req: None if req.url.startswith(server.url) else outside.append(req.url),
            )
            # The read-only kind `trunkline status --dashboard-url` mints; the
            # page's CSP and the security headers hold (a violation is a console error).
            await page.goto(f"{server.url}/?token={viewer_token(KEY, SECRET)}")
            assert page.url == server.url + "/"  # the token left the address bar
            await page.wait_for_selector("#conn.live")
            await page.wait_for_selector('.pool[data-pool="support"]')

            w = ProtoWorker.autonomous(server.ws_url, "support", max_jobs=2)
            workers.append(w)
            await w.connect()
            row = f'.worker[data-worker-id="{w.worker_id}"]'
            await page.wait_for_selector(row)
            assert await page.locator(f"{row} .slot.free").count() == 2

            _, job = await server.post("/v1/dispatches", {"agent_name": "support", "wait": True})
            assert job["state"] == "running"
            await page.wait_for_selector(f'{row}[data-running="1"]')
            assert await page.locator(f"{row} .slot.running").count() == 1
            assert await page.locator(f"{row} .slot.free").count() == 1

            await w.succeed(job["job_id"])
            await page.wait_for_selector(f'{row}[data-running="0"]')
            assert await page.locator(f"{row} .slot.running").count() == 0
            job_row = f'#jobs tr[data-job-id="{job["job_id"]}"]'
            await page.wait_for_selector(f'{job_row}[data-state="succeeded"]')

            await page.click(job_row)
            await page.wait_for_selector('#trace .trace-event[data-event="succeeded"]')
            text = await page.inner_text("#trace")
            assert "offer #1" in text
            assert "answer #1: accepted" in text
            assert w.worker_id in text
            assert "running" in text
            assert await page.locator("#trace .trace-bar .seg.run").count() == 1
            await wait_until(
                lambda: page.evaluate("document.querySelector('#chart').width > 0"),
                what="chart drawn",
            )
            assert errors == []
            assert outside == []
        finally:
            await chromium.close()


async def test_stream_stops_when_the_viewer_goes() -> None:
    """In dev mode the feed needs no token; when the viewer disconnects the server
    drops its subscription (no work is kept for a viewer that left)."""
    from aiohttp.test_utils import TestClient, TestServer

    from trunkline.config import parse_config
    from trunkline.server.app import build_app
    from trunkline.server.dashboard import HUB

    app = build_app(parse_config({}, dev=True))
    async with TestClient(TestServer(app)) as client:
        hub = app[HUB]
        resp = await client.get("/dashboard/stream")
        assert resp.status == 200
        await read_events(resp, 2)
        assert len(hub.viewers) == 1
        resp.close()
        await wait_until(lambda: not hub.viewers, within=5, what="viewer dropped")
