"""`trunkline plan`: size a replica pool with Erlang B/C from traffic figures.

The math lives in `trunkline.core.capacity_plan`; this module only parses flags,
maps input errors back to flag names (exit code 2) and prints a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from trunkline.core.capacity_plan import (
    DEFAULT_BLOCKING_TARGET,
    DEFAULT_MAX_WAIT_S,
    CapacityPlan,
    PlanInputError,
    PlanRequest,
    plan_capacity,
)

# PlanRequest field -> the flag a user typed, for error messages.
_FLAGS = {
    "arrival_rate_per_s": "--rate",
    "mean_call_s": "--call-seconds",
    "cap": "--cap",
    "cold_start_s": "--cold-start-s",
    "blocking_target": "--blocking",
    "wait_target": "--wait-target",
    "max_wait_s": "--max-wait-s",
}


def register(subparsers: Any) -> None:
    """Add the `plan` subcommand to `subparsers` and set its handler."""
    parser = subparsers.add_parser(
        "plan",
        help="size a replica pool (Erlang B/C) from arrival rate and call length",
        description=(
            "Capacity planner. From the arrival rate, mean call length, slots per "
            "replica and replica cold start, compute the offered load, the fixed pool "
            "meeting a blocking target (Erlang B) or a wait target (Erlang C), its wait "
            "figures with a short queue, and the warm spare slots and minimum replicas "
            "an autoscaler needs to ride out one cold start. See docs/plan.md."
        ),
    )
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, metavar="CALLS_PER_S", help="arrivals per second")
    rate.add_argument(
        "--rate-per-min", type=float, metavar="CALLS_PER_MIN", help="arrivals per minute"
    )
    parser.add_argument(
        "--call-seconds", type=float, required=True, metavar="S", help="mean call length"
    )
    parser.add_argument(
        "--cap", type=int, required=True, metavar="C", help="concurrent calls per replica"
    )
    parser.add_argument(
        "--cold-start-s",
        type=float,
        required=True,
        metavar="S",
        help="time from starting a replica to it taking calls",
    )
    parser.add_argument(
        "--blocking",
        type=float,
        metavar="P",
        help=(
            "target probability that a caller finds no free slot "
            f"(default {DEFAULT_BLOCKING_TARGET} unless --wait-target is given)"
        ),
    )
    parser.add_argument(
        "--wait-target",
        type=float,
        metavar="P",
        help="target probability that a queued caller waits longer than --max-wait-s",
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=DEFAULT_MAX_WAIT_S,
        metavar="S",
        help=f"longest a caller may queue (default {DEFAULT_MAX_WAIT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the plan for `args`; 0 on success, 2 (message on stderr) on bad input."""
    per_min = args.rate_per_min is not None
    rate = args.rate_per_min / 60.0 if per_min else args.rate
    try:
        request = PlanRequest(
            arrival_rate_per_s=rate,
            mean_call_s=args.call_seconds,
            cap=args.cap,
            cold_start_s=args.cold_start_s,
            blocking_target=args.blocking,
            wait_target=args.wait_target,
            max_wait_s=args.max_wait_s,
        )
        plan = plan_capacity(request)
    except PlanInputError as exc:
        flag = _FLAGS.get(exc.field, exc.field)
        value = exc.value
        if exc.field == "arrival_rate_per_s" and per_min:
            flag, value = "--rate-per-min", args.rate_per_min
        print(f"trunkline plan: error: {flag} {exc.requirement}, got {value}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"trunkline plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, allow_nan=False))
    else:
        _print_table(plan)
    return 0


def _pct(p: float) -> str:
    return f"{p * 100:.3g}%"


def _seconds(s: float) -> str:
    return "unbounded" if math.isinf(s) else f"{s:.2f} s"


def _print_table(plan: CapacityPlan) -> None:
    # rich costs tens of milliseconds to import; only the table output pays for it.
    from rich.console import Console
    from rich.table import Table

    req, fixed, auto = plan.request, plan.fixed, plan.autoscale
    targets = []
    if req.blocking_target is not None:
        targets.append(f"blocking <= {_pct(req.blocking_target)}")
    if req.wait_target is not None:
        targets.append(f"P(wait > {req.max_wait_s:g} s) <= {_pct(req.wait_target)}")

    table = Table(title="trunkline plan", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")
    table.add_row(
        "offered load",
        f"{plan.offered_load_erlangs:.4g} erl",
        f"{req.arrival_rate_per_s:.4g} calls/s x {req.mean_call_s:g} s",
    )
    table.add_row("target", ", ".join(targets), f"{req.cap} slots per replica")
    table.add_section()
    if fixed.slots_for_blocking is not None:
        table.add_row("slots (Erlang B)", str(fixed.slots_for_blocking), "no queue: refuse at once")
    if fixed.slots_for_wait is not None:
        table.add_row("slots (Erlang C)", str(fixed.slots_for_wait), "queue up to max wait")
    table.add_row(
        "fixed pool",
        f"{fixed.replicas} replicas",
        f"ceil({fixed.slots} / {req.cap}) = {fixed.capacity_slots} slots",
    )
    table.add_row("load per slot", f"{fixed.load_per_slot:.0%}", "offered erlangs / slots")
    table.add_row("blocking", _pct(fixed.blocking_probability), "refused at once, no queue")
    table.add_row("wait probability", _pct(fixed.wait_probability), "queued at all (Erlang C)")
    table.add_row("mean wait", _seconds(fixed.mean_wait_s), "over all callers")
    table.add_row(
        f"P(wait > {req.max_wait_s:g} s)",
        _pct(fixed.wait_exceeds_max_probability),
        "wait longer (Erlang C)",
    )
    table.add_section()
    table.add_row(
        "arrivals in cold start",
        f"{auto.arrivals_mean:.3g}",
        f"Poisson mean, {auto.exposure_s:g} s window",
    )
    table.add_row("spare slots", str(auto.spare_slots), "warm, on top of demand")
    table.add_row("min replicas", str(auto.min_replicas), f"ceil({auto.spare_slots} / {req.cap})")

    console = Console()
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
