"""The dashboard's history view in headless Chromium (Debian's `chromium`,
driven by Playwright): after a restart, the usage charts, the per-pool table
and the job list come from the history store, a filter narrows the list, and
a row opens its trace."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from operator_view import browser
from protoworker import ProtoWorker
from support import KEY, SECRET, ServerProcess, wait_until

from trunkline.auth import agent_token, viewer_token

CONFIG = """
[pools.support]
max_jobs_per_worker = 1
"""


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server whose SQLite history lives in tmp_path (the data directory
    defaults to $XDG_STATE_HOME/trunkline)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    srv = ServerProcess(tmp_path, CONFIG)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def test_history_routes_need_a_read_token(server: ServerProcess) -> None:
    """The history view's feeds answer 401 without a token and 403 for a
    worker's token, like the rest of the dashboard."""
    async with aiohttp.ClientSession() as s:
        for path in ("/dashboard/usage", "/dashboard/jobs"):
            async with s.get(server.url + path) as r:
                assert r.status == 401
            bad = {"Authorization": f"Bearer {agent_token(KEY, SECRET)}"}
            async with s.get(server.url + path, headers=bad) as r:
                assert r.status == 403
        good = {"Authorization": f"Bearer {viewer_token(KEY, SECRET)}"}
        async with s.get(server.url + "/dashboard/jobs?state=nonsense", headers=good) as r:
            assert r.status == 400
            assert "state" in (await r.json())["message"]


@pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")
async def test_history_view_shows_the_stored_figures_after_a_restart(
    server: ServerProcess,
) -> None:
    """A served call and two refused ones, then a restart: the history view
    draws them (bars, peak points, the per-pool table with refusals by
    kind), lists the jobs, filters them by state, and a row opens the trace
    of a job that ended before the restart."""
    from playwright.async_api import async_playwright

    w = ProtoWorker.autonomous(server.ws_url, "support", max_jobs=1)
    await w.connect()
    try:
        _, job = await server.post("/v1/dispatches", {"agent_name": "support", "wait": True})
        assert job["state"] == "running"
        await w.succeed(job["job_id"])
        for _ in range(2):
            await server.post("/v1/dispatches", {"agent_name": "nobody", "max_wait_s": 0})
        await wait_until(lambda: _written(server, 3), what="three records in the history store")
    finally:
        await w.close()
    server.stop()
    server.start()

    async with async_playwright() as pw:
        chromium = await browser.launch(pw)
        try:
            # West of UTC, so a label in local time would name another hour.
            page = await chromium.new_page(
                viewport={"width": 1280, "height": 1400}, timezone_id="America/Los_Angeles"
            )
            errors: list[str] = []
            outside: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on(
                "request",
                lambda req: None if req.url.startswith(server.url) else outside.append(req.url),
            )
            await page.goto(f"{server.url}/?token={viewer_token(KEY, SECRET)}")
            await page.wait_for_selector("#conn.live")
            await page.click("#view-history")
            assert await page.is_hidden("#live-view")
            support = '#h-usage tr[data-pool="support"]'
            await page.wait_for_selector(f'{support}[data-requested="1"]')
            nobody = await page.inner_text('#h-usage tr[data-pool="nobody"]')
            assert "no_workers 2" in nobody
            # Bars for requested (3), placed (1) and refused (2) in this hour.
            values = await page.eval_on_selector_all(
                "#h-calls rect.bar", "els => els.map(e => [e.dataset.series, e.dataset.value])"
            )
            assert sorted(values) == [["placed", "1"], ["refused", "2"], ["requested", "3"]]
            # The buckets are UTC hours, and so are their labels.
            titles = await page.eval_on_selector_all(
                "#h-calls rect.bar title", "els => els.map(e => e.textContent)"
            )
            hour = datetime.fromtimestamp(job["created_at"], UTC)
            label = f"{hour.month}/{hour.day} {hour.hour:02}:00 UTC "
            assert len(titles) == 3
            assert all(t.startswith(label) for t in titles), titles
            assert int(await page.get_attribute("#h-peak", "data-points") or 0) >= 1
            peak = await page.eval_on_selector_all(
                "#h-peak circle.dot", "els => els.map(e => Number(e.dataset.value))"
            )
            assert max(peak) == 1
            assert await page.locator("#h-minutes rect.bar").count() == 1
            assert await page.locator("#h-wait circle.dot").count() >= 2

            row = f'#h-jobs tr[data-job-id="{job["job_id"]}"]'
            await page.wait_for_selector(row)
            assert await page.locator("#h-jobs tbody tr[data-job-id]").count() == 3
            await page.select_option("#h-state", "no_capacity")
            await page.click('#h-form button[type="submit"]')
            await page.wait_for_selector(row, state="detached")
            states = await page.eval_on_selector_all(
                "#h-jobs tbody tr[data-job-id]", "els => els.map(e => e.dataset.state)"
            )
            assert states == ["no_capacity", "no_capacity"]
            await page.select_option("#h-state", "")
            await page.click('#h-form button[type="submit"]')
            await page.click(row)
            await page.wait_for_selector('#trace .trace-event[data-event="succeeded"]')
            assert "answer #1: accepted" in await page.inner_text("#trace")
            assert errors == []
            assert outside == []
        finally:
            await chromium.close()


async def _written(server: ServerProcess, n: int) -> bool:
    health = await server.get("/healthz")
    return bool(health["history"]["written"] >= n and health["history"]["pending"] == 0)
