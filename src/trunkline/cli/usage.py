"""`trunkline usage`: calls per pool and hour (or day), from the server's
history (`GET /v1/usage`, see docs/api.md): requested, placed, refused by
kind, agent minutes, peak concurrent calls, queue wait p50 / p95 / max and
scale events. Buckets are whole UTC hours or days; times in the table are
local.

--since and --until take Unix seconds, ISO-8601 (2026-12-01T14:02Z) or a
span back from now (90s, 15m, 1h, 2d, 1w); defaults: the last 24 hours
(--bucket hour) or 30 days (--bucket day). --json prints the server's
report as is (with --events N, the range's newest N scale events too).

  trunkline usage --since 7d --bucket day
  trunkline usage --pool support --since 2026-12-01 --until 2026-12-02
  trunkline usage --since 1h --events 20 --json

A parameter the server refuses exits 2 with its message.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from trunkline.cli._client import OK, Client, add_client_args, console, print_json, run


def register(subparsers: Any) -> None:
    """Add the `usage` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "usage",
        help="calls, refusals, agent minutes, peak concurrency and queue waits per pool and hour",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--since", help="from (Unix s, ISO-8601, or 1h / 2d back)")
    p.add_argument("--until", help="to (same forms; default now)")
    p.add_argument("--pool", "--agent", dest="pool", help="this pool (agent name) only")
    p.add_argument("--bucket", choices=("hour", "day"), default="hour", help="default: hour")
    p.add_argument("--events", type=int, default=0, help="--json: list this many scale events")
    add_client_args(p)
    p.set_defaults(handler=_run)


def params(args: argparse.Namespace) -> dict[str, str]:
    """The query string of `args`."""
    out = {"bucket": args.bucket}
    for name in ("since", "until", "pool"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.events:
        out["events"] = str(args.events)
    return out


def _run(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        report = await client.request("GET", "/v1/usage", params=params(args))
        if args.json:
            print_json(report)
        else:
            render(report)
        return OK

    return run(args, body)


def _wait(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def render(report: dict[str, Any]) -> None:
    """The report as a table: one line per pool and bucket, then totals."""
    from rich.table import Table

    out = console()
    if not out.is_terminal:
        out.width = max(out.width, 160)  # a pipe or a file: one line per row, not squeezed
    rows = report.get("rows") or []
    day = report.get("bucket") == "day"
    fmt = "%Y-%m-%d" if day else "%Y-%m-%d %H:%M"
    span = (
        f"{time.strftime(fmt, time.localtime(report['since']))} to "
        f"{time.strftime(fmt, time.localtime(report['until']))}"
    )
    if not rows:
        out.print(f"no calls or scale events from {span}")
        return
    table = Table(
        header_style="bold", box=None, pad_edge=False, title=f"usage per {report['bucket']}, {span}"
    )
    cols = ("bucket", "pool", "requested", "placed", "refused", "agent min", "peak")
    for col in (*cols, "wait p50 s", "p95", "max", "refused by kind", "scale events"):
        left = col in ("bucket", "pool", "refused by kind", "scale events")
        table.add_column(col, justify="left" if left else "right")
    for r in rows:
        waits = r.get("queue_wait_s") or {}
        table.add_row(
            time.strftime(fmt, time.localtime(r["start"])),
            r.get("pool") or "(default)",
            str(r["requested"]),
            str(r["placed"]),
            f"[red]{r['refused_total']}[/]" if r["refused_total"] else "0",
            f"{r['agent_minutes']:.1f}",
            str(r["peak_concurrent"]),
            _wait(waits.get("p50")),
            _wait(waits.get("p95")),
            _wait(waits.get("max")),
            _counts(r.get("refused") or {}),
            _counts(r.get("scale_events") or {}),
        )
    out.print(table)
    total = sum(r["requested"] for r in rows)
    refused = sum(r["refused_total"] for r in rows)
    minutes = sum(r["agent_minutes"] for r in rows)
    peak = max(r["peak_concurrent"] for r in rows)
    out.print(
        f"total: {total} requested, {refused} refused, {minutes:.1f} agent minutes, "
        f"peak {peak} concurrent in one pool"
    )
