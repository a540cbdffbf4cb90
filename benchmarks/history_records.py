"""Realistic ended-job records for the history benchmarks, and the stores
they run against (not a benchmark itself).

A month of a busy deployment: jobs spread evenly over `days`, six pools of
uneven size, 20,000 callers of uneven frequency (a few call often), three
trunks, mostly succeeded calls of ~3 minutes (some hours long), 70 % through
the SIP edge, each with the 7-event trace a placed job gets."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # stores.pgserver: a throwaway PostgreSQL

from stores.pgserver import PostgresServer  # noqa: E402

from trunkline.stores import JobRecord, SipCallRecord, TraceRecord  # noqa: E402

POOLS = ("support", "sales", "billing", "onboarding", "retention", "after-hours")
POOL_WEIGHTS = (40, 25, 15, 10, 7, 3)
TRUNKS = ("carrier-a", "carrier-b", "carrier-c")
STATES = ("succeeded", "no_capacity", "failed", "cancelled", "worker_lost", "rejected")
STATE_WEIGHTS = (82, 9, 4, 3, 1, 1)
CALLERS = 20_000
START = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def caller(i: int) -> str:
    return f"+4930{i:07d}"


def records(n: int, *, days: float = 30.0, seed: int = 12, first: int = 0) -> Iterator[JobRecord]:
    """`n` records created evenly over `days` from START, in creation order."""
    rng = random.Random(seed)
    step = days * 86_400.0 / max(n, 1)
    for i in range(first, first + n):
        created = START + i * step + rng.random() * step
        state = rng.choices(STATES, STATE_WEIGHTS)[0]
        pool = rng.choices(POOLS, POOL_WEIGHTS)[0]
        wait = rng.expovariate(2.0)
        if state == "no_capacity":
            ended = created + 10.0
            placed = running = None
            worker = None
        else:
            placed = created + wait
            running = placed + 0.2
            long_call = rng.random() < 0.01
            ended = running + (rng.uniform(1800, 7200) if long_call else rng.expovariate(1 / 180))
            worker = f"AW_{pool}-{rng.randrange(40)}"
        sip = None
        if rng.random() < 0.7:
            who = int(rng.paretovariate(1.2)) % CALLERS
            sip = SipCallRecord(
                call_id=f"{i:x}-{rng.getrandbits(48):x}@edge",
                from_number=caller(who),
                to_number="+49800123456",
                trunk=rng.choice(TRUNKS),
                final_status=200 if state == "succeeded" else 486,
            )
        trace = [TraceRecord(created, "requested")]
        if placed is not None and running is not None:
            trace += [
                TraceRecord(created + 0.0004, "offered", worker),
                TraceRecord(placed, "accepted", worker),
                TraceRecord(placed + 0.0002, "assigned", worker),
                TraceRecord(running, "running", worker),
                TraceRecord(ended - 0.01, "terminating", worker, "SIP call ended: BYE"),
            ]
        trace.append(TraceRecord(ended, state, worker, "" if state == "succeeded" else "why"))
        yield JobRecord(
            job_id=f"AJ_{i:010d}{rng.getrandbits(20):05x}",
            dispatch_id=f"AD_{i:010d}",
            agent_name=pool,
            room=f"sip-{i:x}",
            metadata='{"caller": "%s", "lang": "de"}' % (sip.from_number if sip else ""),
            attributes=(("lk.sip.trunk", sip.trunk if sip else ""), ("tier", "gold")),
            state=state,
            reason="" if state == "succeeded" else f"{state}: see trace",
            worker_id=worker,
            replica_id=None if worker is None else f"{pool}-{worker[-2:]}",
            created_at=created,
            placed_at=placed,
            running_at=running,
            ended_at=ended,
            queue_wait_s=wait if placed is not None else 10.0,
            max_wait_s=10.0,
            trace=tuple(trace),
            sip=sip,
        )


__all__ = ["ROOT", "PostgresServer", "caller", "records"]
