"""`trunkline jobs`: live jobs (oldest first), then ended ones (newest first),
from the server's history (across restarts).

Every filter goes to the server (`GET /v1/jobs`, see docs/api.md): --state
and --outcome take a state or a comma list (queued, running, succeeded,
failed, rejected, no_capacity, worker_lost, cancelled), --since and --until
take Unix seconds, ISO-8601 (2026-12-01T14:02Z) or a span back from now
(90s, 15m, 1h, 2d, 1w). The table and --json follow the server's cursors up
to --limit jobs (default 50; --json also prints the `next_cursor` to go on
from, and --cursor starts there). --format csv|jsonl streams every matching
job (or --limit of them) to stdout, as the server exports them.

  trunkline jobs --since 1h --outcome no_capacity --pool support
  trunkline jobs --caller +4930111 --since 2026-12-01 --json
  trunkline jobs --since 7d --format csv > jobs.csv

A filter the server refuses (an unknown state, a bad time) exits 2 with its
message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import aiohttp

from trunkline.cli._client import (
    OK,
    UNREACHABLE,
    USAGE,
    Client,
    CliError,
    _http_error,
    add_client_args,
    console,
    print_json,
    run,
    sign_viewer_token,
)
from trunkline.cli._fmt import fmt_clock, fmt_ms, styled

PAGE = 1000  # the server's largest page
_FILTERS = (
    ("pool", "pool"),
    ("room", "room"),
    ("worker", "worker"),
    ("trunk", "trunk"),
    ("caller", "caller"),
    ("since", "since"),
    ("until", "until"),
)


def register(subparsers: Any) -> None:
    """Add the `jobs` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "jobs",
        help="list jobs, live first, from the history (filters, CSV / JSON lines export)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f = p.add_argument_group("filters (all must match)")
    f.add_argument("--state", action="append", help="in this state (or comma list); repeatable")
    f.add_argument("--outcome", action="append", help="ended this way (same as --state)")
    f.add_argument("--pool", "--agent", dest="pool", help="of this pool (agent name)")
    f.add_argument("--room", help="in this room")
    f.add_argument("--worker", help="placed on this worker id")
    f.add_argument("--trunk", help="came in over this SIP trunk")
    f.add_argument("--caller", help="from this caller number (the SIP From user)")
    f.add_argument("--since", help="created at or after (Unix s, ISO-8601, or 1h / 2d back)")
    f.add_argument("--until", help="created before (same forms)")
    p.add_argument("--limit", type=int, help="at most this many jobs (default 50; export: all)")
    p.add_argument("--cursor", help="start at a next_cursor printed by --json")
    p.add_argument(
        "--format",
        choices=("table", "csv", "jsonl"),
        default="table",
        help="csv or jsonl: stream the jobs to stdout (default: a table)",
    )
    add_client_args(p)
    p.set_defaults(handler=_run)


def params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The query string of `args`' filters (states repeated as given)."""
    out: list[tuple[str, str]] = []
    for name in ("state", "outcome"):
        out += [(name, v) for v in getattr(args, name) or ()]
    for attr, name in _FILTERS:
        value = getattr(args, attr)
        if value is not None:
            out.append((name, value))
    if args.cursor:
        out.append(("cursor", args.cursor))
    return out


def _run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        print("trunkline jobs: error: --limit must be >= 1", file=sys.stderr)
        return USAGE
    if args.format != "table" and args.json:
        print(
            "trunkline jobs: error: --json and --format are two outputs; pick one", file=sys.stderr
        )
        return USAGE

    async def body(client: Client) -> int:
        if args.format != "table":
            return await export(client, args)
        want = args.limit or 50
        jobs: list[dict[str, Any]] = []
        cursor = args.cursor
        query = [q for q in params(args) if q[0] != "cursor"]
        while True:
            page_q = [*query, ("limit", str(min(PAGE, want - len(jobs))))]
            if cursor:
                page_q.append(("cursor", cursor))
            page = await client.request("GET", "/v1/jobs", params=_multi(page_q))
            jobs += page["jobs"]
            cursor = page.get("next_cursor")
            if cursor is None or len(jobs) >= want or not page["jobs"]:
                break
        if args.json:
            print_json({"jobs": jobs, "next_cursor": cursor})
        else:
            render(jobs)
            if cursor is not None:
                console().print(f"more jobs match: raise --limit ({want}), or page with --json")
        return OK

    return run(args, body)


def _multi(pairs: list[tuple[str, str]]) -> Any:
    """`pairs` as aiohttp query params (repeated names kept)."""
    from multidict import MultiDict

    return MultiDict(pairs)


async def export(client: Client, args: argparse.Namespace) -> int:
    """Stream the server's CSV / JSON lines export to stdout as it comes (the
    server follows the cursors; memory here stays at one chunk)."""
    target = client.target
    query = [*params(args), ("format", args.format)]
    if args.limit is not None:
        query.append(("limit", str(args.limit)))
    url = target.url + "/v1/jobs"
    headers = {"Authorization": f"Bearer {sign_viewer_token(target, ttl_s=3600)}"}
    # No overall timeout: an export of a million records takes a while; a
    # server that stops sending for a minute is given up on.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    out = sys.stdout.buffer
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, params=_multi(query), headers=headers) as resp,
        ):
            if resp.status != 200:
                text = await resp.text()
                try:
                    data = json.loads(text)
                except ValueError:
                    data = None
                raise _http_error(resp.status, data, text, url)
            async for chunk in resp.content.iter_chunked(1 << 16):
                out.write(chunk)
            out.flush()
    except aiohttp.ClientConnectorError as exc:
        raise CliError(
            UNREACHABLE, f"cannot reach trunkline at {target.url}: {exc.os_error}"
        ) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise CliError(UNREACHABLE, f"export from {url} failed: {what}") from None
    except BrokenPipeError:
        pass  # `| head`: the reader has what it wanted
    return OK


def render(jobs: list[dict[str, Any]]) -> None:
    """The jobs as a table. Every value from the server is escaped: a room,
    reason or caller number is the caller's text, never rich markup."""
    from rich.markup import escape
    from rich.table import Table

    out = console()
    if not jobs:
        out.print("no jobs")
        return
    table = Table(header_style="bold", box=None, pad_edge=False)
    cols = ("job", "agent", "state", "worker", "created", "queued", "duration", "reason")
    sip = any(j.get("sip") for j in jobs)
    for col in (*cols, *(("caller", "trunk", "sip") if sip else ())):
        table.add_column(col, justify="right" if col in ("queued", "duration") else "left")
    now = time.time()
    for j in jobs:
        start = j.get("running_at") or j.get("placed_at")
        end = j.get("ended_at") or now
        duration = fmt_ms(end - start) if start else "-"
        row = [
            escape(str(j["job_id"])),
            escape(str(j.get("agent_name") or "(default)")),
            styled(escape(str(j["state"]))),
            escape(str(j.get("worker_id") or "-")),
            fmt_clock(j.get("created_at")),
            fmt_ms(j.get("queue_wait_s")),
            duration,
            escape(str(j.get("reason") or "")),
        ]
        if sip:
            call = j.get("sip") or {}
            final = call.get("final_status")
            row += [escape(str(call.get(k) or "-")) for k in ("from", "trunk")]
            row.append(str(final or "-"))
        table.add_row(*row)
    out.print(table)
