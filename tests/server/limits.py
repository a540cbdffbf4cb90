"""Shared by the limit tests (issue 9): a bystander that must keep being served
through every attack, and a strict JSON decoder."""

from __future__ import annotations

import json
from typing import Any

from protoworker import ProtoWorker
from server.helpers import Srv


async def bystander(srv: Srv, pool: str = "bystander") -> ProtoWorker:
    """A well-behaved worker in its own pool."""
    w = ProtoWorker.autonomous(srv.url, pool, max_jobs=2)
    srv.workers.append(w)
    await w.connect()
    return w


async def served(srv: Srv, w: ProtoWorker, pool: str = "bystander") -> None:
    """A dispatch to the bystander's pool runs on it and ends: the server still serves."""
    job_id = (await srv.dispatch(pool))["job_id"]
    await srv.wait_state(job_id, "running")
    assert job_id in w.active
    await w.succeed(job_id)
    await srv.wait_state(job_id, "succeeded")


def _no_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def strict_json(text: str) -> Any:
    """Decode as a strict JSON parser (a browser's) would: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=_no_constant)
