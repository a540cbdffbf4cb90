"""`GET /v1/usage`: the usage report per pool and hour or day, from the history.

Query parameters (each at most once; unknown ones are refused, so a
misspelling is not silently ignored):

- `bucket`: `hour` (default) or `day`; buckets are UTC-aligned and whole.
- `since`, `until`: Unix seconds, ISO-8601 or a span back from now (`1h`,
  `7d`), as `GET /v1/jobs` reads them. Defaults: `until` now, `since` 24
  hours (bucket=hour) or 30 days (bucket=day) before `until`. At most 2,000
  buckets.
- `pool` (or `agent_name`): one pool only.
- `events`: also list up to this many of the range's scale events, newest
  first (0..1000, default 0).

A bad parameter is 400 `invalid_argument` naming it; a history store that
cannot answer is 503 `unavailable`. The figures' definitions are in
`trunkline.stores.usage` and docs/history.md. The dashboard's history view
reads the same report through `usage_json`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from trunkline.runtime.dispatcher import Dispatcher
from trunkline.server.job_params import MAX_VALUE_CHARS, ParamError, parse_time
from trunkline.server.keys import AUTH, DISPATCHER
from trunkline.server.rest import ApiError
from trunkline.server.views import json_response
from trunkline.stores import InvalidQuery, StoreError
from trunkline.stores.usage import BUCKETS, MAX_EVENT_LIMIT, ScaleEventRecord, UsageRow

routes = web.RouteTableDef()

PARAMS = ("bucket", "since", "until", "pool", "agent_name", "events")
DEFAULT_SPAN_S = {"hour": 86_400.0, "day": 30 * 86_400.0}


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) != 1:
        raise ParamError(f"'{name}' given {len(values)} times; give it once")
    value = values[0]
    if not value:
        raise ParamError(f"'{name}' is empty; leave it out for the default")
    if len(value) > MAX_VALUE_CHARS:
        raise ParamError(f"'{name}' is longer than {MAX_VALUE_CHARS} characters")
    return value


def row_json(r: UsageRow) -> dict[str, Any]:
    """One pool's figures in one bucket as the API shows them."""
    return {
        "pool": r.pool,
        "start": r.start,
        "end": r.start + BUCKETS[r.bucket],
        "requested": r.requested,
        "placed": r.placed,
        "refused": dict(r.refused),
        "refused_total": r.refused_total,
        "agent_minutes": round(r.agent_minutes, 6),
        "peak_concurrent": r.peak_concurrent,
        "queue_wait_s": {"p50": r.wait_p50_s, "p95": r.wait_p95_s, "max": r.wait_max_s},
        "scale_events": dict(r.scale_events),
    }


def event_json(e: ScaleEventRecord) -> dict[str, Any]:
    """A stored scale event as the API shows it."""
    return {
        "event_id": e.event_id,
        "at": e.at,
        "pool": e.pool,
        "kind": e.kind,
        "from": e.from_replicas,
        "to": e.to_replicas,
        "desired": e.desired,
        "reason": e.reason,
        "demand": {
            "running": e.running,
            "reserved": e.reserved,
            "queued": e.queued,
            "refused": e.refused,
        },
        "slots_per_replica": e.slots_per_replica,
        "spare_slots": e.spare_slots,
        "replicas": list(e.replicas),
    }


async def usage_json(
    d: Dispatcher, query: Mapping[str, Sequence[str]], *, now: float
) -> dict[str, Any]:
    """The report a query string asks for, as JSON. Raises `ParamError` or
    `InvalidQuery` (a 400) or `StoreError` (a 503)."""
    unknown = sorted(set(query) - set(PARAMS))
    if unknown:
        raise ParamError(f"unknown parameter(s) {unknown}; allowed: {', '.join(PARAMS)}")
    bucket = _one(query, "bucket") or "hour"
    if bucket not in BUCKETS:
        raise ParamError(f"'bucket' must be one of {', '.join(BUCKETS)}, got {bucket[:64]!r}")
    until_text, since_text = _one(query, "until"), _one(query, "since")
    until = parse_time("until", until_text, now) if until_text else now
    since = parse_time("since", since_text, now) if since_text else until - DEFAULT_SPAN_S[bucket]
    pool, agent = _one(query, "pool"), _one(query, "agent_name")
    if pool is not None and agent is not None and pool != agent:
        raise ParamError("'pool' and 'agent_name' name the same filter; give one")
    pool = pool if pool is not None else agent
    events_text = _one(query, "events")
    n_events = 0
    if events_text is not None:
        try:
            n_events = int(events_text)
        except ValueError:
            n_events = -1
        if not 0 <= n_events <= MAX_EVENT_LIMIT:
            raise ParamError(f"'events' must be an integer in [0, {MAX_EVENT_LIMIT}]")
    rows = await d.usage(since=since, until=until, bucket=bucket, pool=pool)
    out: dict[str, Any] = {
        "since": since,
        "until": until,
        "bucket": bucket,
        "bucket_s": BUCKETS[bucket],
        "pool": pool,
        "rows": [row_json(r) for r in rows],
    }
    if n_events:
        width = BUCKETS[bucket]
        lo = (since // width) * width
        hi = -(-until // width) * width
        events = await d.scale_events(pool=pool, since=lo, until=hi, limit=n_events)
        out["scale_events"] = [event_json(e) for e in events]
    return out


@routes.get("/v1/usage")
async def get_usage(request: web.Request) -> web.Response:
    """The usage report (see the module docstring and docs/api.md)."""
    request.app[AUTH].require_reader(request.headers.get("Authorization"), all_rooms=True)
    return await answer(request)


async def answer(request: web.Request) -> web.Response:
    """The report of `request`'s query string, or its error as JSON (the
    caller has checked access)."""
    d: Dispatcher = request.app[DISPATCHER]
    query = {k: request.query.getall(k) for k in request.query}
    try:
        body = await usage_json(d, query, now=time.time())
    except (ParamError, InvalidQuery) as exc:
        raise ApiError(400, "invalid_argument", str(exc)) from None
    except StoreError:
        raise ApiError(
            503,
            "unavailable",
            "the job history cannot answer right now (see /healthz); try again",
        ) from None
    return json_response(body)
