"""`trunkline dispatch AGENT`: request a session for an agent.

Sends `POST /v1/dispatches`. Without `--wait` it prints the job as created and
exits 0. With `--wait` the server answers once the job runs or ends; the exit
code is then 0 if the job is running (or already succeeded) and 1 if it ended
any other way (no capacity, rejected, ...) or was still not running, with the
job's reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trunkline.cli._client import FAILED, OK, Client, add_client_args, console, print_json, run
from trunkline.cli._fmt import GOOD_END, fmt_ms, styled

# How much longer than the server's own wait the client allows for the answer.
_WAIT_MARGIN_S = 15.0


def register(subparsers: Any) -> None:
    """Add the `dispatch` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "dispatch",
        help="request a session for an agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("agent", metavar="AGENT", help="agent name (pool)")
    p.add_argument("--room", default="", help="room name (default: a fresh one)")
    p.add_argument(
        "--metadata", default="", help="job metadata handed to the agent (a JSON text, usually)"
    )
    p.add_argument(
        "--max-wait", type=float, metavar="S", help="longest to queue for a slot (default: pool's)"
    )
    p.add_argument(
        "--wait", action="store_true", help="wait until the job runs or ends; exit 1 if it failed"
    )
    add_client_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        req: dict[str, Any] = {"agent_name": args.agent, "wait": bool(args.wait)}
        if args.room:
            req["room"] = args.room
        if args.metadata:
            req["metadata"] = args.metadata
        if args.max_wait is not None:
            req["max_wait_s"] = args.max_wait
        # With --wait the server holds the answer up to max wait + 10 s.
        timeout = None
        if args.wait:
            timeout = (args.max_wait if args.max_wait is not None else 3600.0) + _WAIT_MARGIN_S
        job = await client.request("POST", "/v1/dispatches", body=req, timeout_s=timeout)
        if args.json:
            print_json(job)
        else:
            render(job)
        if not args.wait:
            return OK
        state = job.get("state")
        if state == "running" or state in GOOD_END:
            return OK
        why = job.get("reason") or f"job is still {state}"
        print(f"trunkline dispatch: job {job['job_id']} {state}: {why}", file=sys.stderr)
        return FAILED

    return run(args, body)


def render(job: dict[str, Any]) -> None:
    out = console()
    out.print(
        f"job [bold]{job['job_id']}[/] ({job.get('dispatch_id', '')}) agent "
        f"{job.get('agent_name') or '(default)'} room {job.get('room')}: {styled(job['state'])}"
    )
    if job.get("worker_id"):
        out.print(f"  worker {job['worker_id']}")
    if job.get("placed_at") and job.get("created_at"):
        out.print(
            f"  placed after {fmt_ms(job['placed_at'] - job['created_at'])}, "
            f"queued {fmt_ms(job.get('queue_wait_s'))}"
        )
    if job.get("reason"):
        out.print(f"  reason: {job['reason']}")
