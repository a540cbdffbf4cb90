"""`trunkline jobs`: live jobs (oldest first), then ended ones (newest first).

Filters go to the server (`GET /v1/jobs?state=&agent_name=&limit=`); an
unknown state is refused by the server with the list of allowed ones (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from trunkline.cli._client import OK, Client, add_client_args, console, print_json, run
from trunkline.cli._fmt import fmt_clock, fmt_ms, styled


def register(subparsers: Any) -> None:
    """Add the `jobs` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "jobs",
        help="list jobs, live first (filter by state and agent/pool)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--state", help="only jobs in this state (queued, running, succeeded, ...)")
    p.add_argument("--agent", "--pool", dest="agent", help="only jobs of this agent name (pool)")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    add_client_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("trunkline jobs: error: --limit must be >= 1", file=sys.stderr)
        return 2

    async def body(client: Client) -> int:
        params = {"limit": str(args.limit)}
        if args.state:
            params["state"] = args.state
        if args.agent is not None:
            params["agent_name"] = args.agent
        jobs = (await client.request("GET", "/v1/jobs", params=params))["jobs"]
        if args.json:
            print_json({"jobs": jobs})
        else:
            render(jobs)
        return OK

    return run(args, body)


def render(jobs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    out = console()
    if not jobs:
        out.print("no jobs")
        return
    table = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("job", "agent", "state", "worker", "created", "queued", "duration", "reason"):
        table.add_column(col, justify="right" if col in ("queued", "duration") else "left")
    now = time.time()
    for j in jobs:
        start = j.get("running_at") or j.get("placed_at")
        end = j.get("ended_at") or now
        duration = fmt_ms(end - start) if start else "-"
        table.add_row(
            j["job_id"],
            j.get("agent_name") or "(default)",
            styled(j["state"]),
            j.get("worker_id") or "-",
            fmt_clock(j.get("created_at")),
            fmt_ms(j.get("queue_wait_s")),
            duration,
            j.get("reason") or "",
        )
    out.print(table)
