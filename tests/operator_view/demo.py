"""Screenshot of a real run for the README: `python tests/operator_view/demo.py [OUT.png]`.

Starts a trunkline server, connects protocol-level workers (two pools, one
worker that soft-refuses its first offers), sends a burst of calls bigger than
the capacity so some queue and some end `no_capacity`, lets calls end at
staggered times, opens the dashboard in headless Chromium, opens the trace of a
job that was refused before it was placed, and saves a screenshot
(default docs/dashboard.png). Bounded: about 20 seconds in all.
Needs chromium and playwright (see browser.py).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from browser import launch, missing  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402
from protoworker import ProtoWorker  # noqa: E402
from support import KEY, SECRET, ServerProcess, wait_until  # noqa: E402

from trunkline.auth import admin_token  # noqa: E402

CONFIG = """
[pools.support]
max_jobs_per_worker = 4
queue_max_wait_s = 30
[pools.sales]
max_jobs_per_worker = 2
queue_max_wait_s = 1
placement = "spread"
"""


async def main(out: Path) -> None:
    why = missing()
    if why:
        raise SystemExit(why)
    tmp = Path(tempfile.mkdtemp(prefix="trunkline-demo-"))
    srv = ServerProcess(tmp, CONFIG)
    srv.start()
    workers: list[ProtoWorker] = []
    try:
        refusals = {"n": 0}

        def picky(job: object) -> str:
            refusals["n"] += 1
            return "refuse" if refusals["n"] <= 2 else "accept"

        picky_worker = ProtoWorker.autonomous(srv.ws_url, "support", max_jobs=2, auto=picky)  # type: ignore[arg-type]
        workers.append(picky_worker)
        for _ in range(2):
            workers.append(ProtoWorker.autonomous(srv.ws_url, "support", max_jobs=4))
        for _ in range(2):
            workers.append(ProtoWorker.autonomous(srv.ws_url, "sales", max_jobs=2))
        for w in workers:
            await w.connect()

        async with async_playwright() as pw:
            browser = await launch(pw)
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.goto(f"{srv.url}/?token={admin_token(KEY, SECRET)}")
            await page.wait_for_selector("#conn.live")

            async def call(agent: str) -> str:
                _, job = await srv.post("/v1/dispatches", {"agent_name": agent})
                return str(job["job_id"])

            # A burst over capacity (support has 10 slots, sales 4), then waves
            # of calls while others end, so the slot bars and the chart move.
            first = await call("support")
            jobs = [first, *await asyncio.gather(*(call("support") for _ in range(13)))]
            jobs += await asyncio.gather(*(call("sales") for _ in range(7)))

            def running() -> int:
                return sum(len(w.active) for w in workers)

            await wait_until(lambda: running() >= 12, what="calls running")
            rng = random.Random(7)
            for step in range(24):
                for w in workers:
                    if w.active and rng.random() < 0.35:
                        await w.succeed(rng.choice(sorted(w.active)))
                if step % 3 == 0 and step < 20:
                    n = rng.randint(1, 4)
                    jobs += await asyncio.gather(*(call("support") for _ in range(n)))
                    jobs += await asyncio.gather(*(call("sales") for _ in range(n // 2 + 1)))
                await asyncio.sleep(0.5)  # ok-sleep: pacing the demo, not waiting on state
            # Open the trace of a listed job that was refused before it was placed.
            listed = await page.eval_on_selector_all(
                "#jobs tbody tr[data-job-id]", "rows => rows.map(r => r.dataset.jobId)"
            )
            traced = listed[0]
            for job_id in listed:
                job = await srv.get(f"/v1/jobs/{job_id}")
                events = {ev["event"] for ev in job["trace"]}
                if "refused" in events and "running" in events:
                    traced = job_id
                    break
            await page.click(f'tr[data-job-id="{traced}"]')
            await page.wait_for_selector("#trace .trace-event")
            await page.wait_for_timeout(300)
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
        print(f"screenshot saved to {out}")
    finally:
        for w in workers:
            await w.close()
        srv.stop()


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "docs/dashboard.png"
    asyncio.run(main(target))
