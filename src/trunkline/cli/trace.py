"""`trunkline trace JOB_ID`: why a job went where it went.

Prints the job's timeline from `GET /v1/jobs/{id}` with `+ms` offsets from the
request: each offer numbered and the worker it went to, each answer paired
with its offer (accepted, rejected, refused, timed out, withdrawn) and how long
the worker took, queueing, placement, running, and the end with its reason.
Exit 0 when the job exists (whatever its outcome: `--json` carries the state),
1 when the server knows no such job.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trunkline.cli._client import OK, Client, add_client_args, console, print_json, run
from trunkline.cli._fmt import fmt_clock, fmt_ms, styled

# Trace events that close an open offer, and how the timeline names them.
ANSWERS = {
    "accepted": "accepted",
    "rejected": "rejected (terminate=true: the job ends)",
    "refused": "refused (terminate=false: the job is re-placed)",
    "offer_timeout": "no answer (offer withdrawn)",
    "offer_withdrawn": "offer withdrawn",
}
TERMINAL = frozenset({"succeeded", "failed", "rejected", "no_capacity", "worker_lost", "cancelled"})


def register(subparsers: Any) -> None:
    """Add the `trace` subcommand to the `trunkline` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "trace",
        help="a job's timeline: offers and answers, queueing, placement, end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_id", metavar="JOB_ID")
    add_client_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        job = await client.request("GET", f"/v1/jobs/{args.job_id}")
        if args.json:
            print_json(job)
        else:
            render(job)
        return OK

    return run(args, body)


@dataclass(slots=True)
class Line:
    """One timeline row: offset, label, worker and detail."""

    t_ms: float
    label: str
    worker: str
    detail: str


def timeline(trace: list[Mapping[str, Any]]) -> list[Line]:
    """Trace events as labelled rows; answers are paired with their offers."""
    lines: list[Line] = []
    open_offer: tuple[int, str, float] | None = None  # (number, worker, t_ms)
    n_offers = 0
    for ev in trace:
        event = str(ev.get("event", "?"))
        worker = ev.get("worker_id") or ""
        detail = ev.get("detail") or ""
        t = float(ev.get("t_ms", 0.0))
        if event == "offered":
            n_offers += 1
            open_offer = (n_offers, worker, t)
            lines.append(Line(t, f"offer #{n_offers}", worker, f"offered to {worker}"))
            continue
        if event in ANSWERS and open_offer is not None and open_offer[1] == worker:
            num, _, t0 = open_offer
            open_offer = None
            took = f"after {t - t0:.2f} ms"
            what = ANSWERS[event]
            if event == "accepted":
                what += ": assignment sent"
            # "terminate=..." details are already said by the answer's name.
            if detail and not detail.startswith("terminate="):
                took += f"; {detail}"
            text = f"{what}; {took}"
            lines.append(Line(t, f"  answer #{num}", worker, text))
            continue
        if event in TERMINAL and open_offer is not None:
            open_offer = None  # the job ended while its offer was open
        label = styled(event) if event in TERMINAL else event
        lines.append(Line(t, label, worker, detail))
    return lines


def render(job: Mapping[str, Any]) -> None:
    from rich.table import Table

    out = console()
    out.print(
        f"[bold]job {job['job_id']}[/]  agent {job.get('agent_name') or '(default)'}  "
        f"room {job.get('room', '-')}  state {styled(job['state'])}"
    )
    created = job.get("created_at")
    facts = [f"requested {fmt_clock(created)}", f"queued {fmt_ms(job.get('queue_wait_s'))}"]
    if job.get("placed_at") and created:
        facts.append(f"placed after {fmt_ms(job['placed_at'] - created)} on {job.get('worker_id')}")
    if job.get("running_at") and job.get("ended_at"):
        facts.append(f"ran {fmt_ms(job['ended_at'] - job['running_at'])}")
    if job.get("ended_at") and created:
        facts.append(f"ended after {fmt_ms(job['ended_at'] - created)}")
    out.print("  " + " · ".join(facts))
    if job.get("reason"):
        out.print(f"  reason: {job['reason']}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("+ms", justify="right")
    table.add_column("event")
    table.add_column("worker")
    table.add_column("detail")
    for line in timeline(job.get("trace") or []):
        table.add_row(f"+{line.t_ms:.3f}", line.label, line.worker or "", line.detail)
    out.print(table)
