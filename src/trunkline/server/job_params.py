"""The query string of `GET /v1/jobs`, read into a `JobFilter`, a page and a format.

Every parameter is checked here and a bad one raises `ParamError` naming the
parameter and what it allows (the handler answers 400 with it); unknown
parameters are refused too, so a misspelt filter (`?stat=failed`) is not
silently ignored. Nothing here filters jobs: that is the store's job.

Times (`since`, `until`) are Unix seconds (`1764597720`, `1764597720.5`),
ISO-8601 (`2026-12-01T14:02:00Z`, `2026-12-01T14:02:00+01:00`,
`2026-12-01`; without an offset: UTC), or a span back from now: a number and
one of s, m, h, d, w (`90s`, `15m`, `1h`, `1.5d`, `2w`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trunkline.core import JobState
from trunkline.stores import MAX_LIMIT, InvalidQuery, JobFilter

DEFAULT_LIMIT = 100
MAX_VALUE_CHARS = 1024  # longer than any room name, id or number the server makes
FORMATS = ("json", "csv", "jsonl")
PARAMS = (
    "state",
    "outcome",
    "pool",
    "agent_name",
    "room",
    "worker",
    "worker_id",
    "dispatch_id",
    "trunk",
    "caller",
    "since",
    "until",
    "limit",
    "cursor",
    "format",
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 7 * 86_400.0}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STATES = ", ".join(s.value for s in JobState)


class ParamError(ValueError):
    """A bad query parameter; the message names it and what is allowed."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """What `GET /v1/jobs` was asked. `limit` is the page size for `json`; for
    an export (`csv`, `jsonl`) it caps the records streamed (None: all)."""

    flt: JobFilter
    limit: int | None
    cursor: str | None
    format: str


def parse_time(name: str, text: str, now: float) -> float:
    """`text` (Unix seconds, ISO-8601 or a span back from `now`) as Unix
    seconds; `ParamError` naming `name` for anything else."""
    value = text.strip()
    if _NUMBER.fullmatch(value):
        t = float(value)
    elif m := _SPAN.fullmatch(value):
        t = now - float(m.group(1)) * _UNITS[m.group(2)]
    else:
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ParamError(
                f"'{name}' must be Unix seconds (1764597720), ISO-8601 "
                f"(2026-12-01T14:02:00Z) or a span back from now (90s, 15m, 1h, 2d, 1w); "
                f"got {text[:64]!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        t = when.timestamp()
    if not math.isfinite(t):
        raise ParamError(f"'{name}' is out of range: {text[:64]!r}")
    return t


def _one(values: Sequence[str], name: str) -> str:
    if len(values) != 1:
        raise ParamError(f"'{name}' given {len(values)} times; give it once")
    value = values[0]
    if len(value) > MAX_VALUE_CHARS:
        raise ParamError(f"'{name}' is longer than {MAX_VALUE_CHARS} characters")
    if not value:
        raise ParamError(f"'{name}' is empty; leave it out to match anything")
    return value


def parse_query(query: Mapping[str, Sequence[str]], *, now: float) -> JobQuery:
    """The `JobQuery` of a query string given as name -> every value given
    (repeated parameters keep each value). Raises `ParamError`."""
    unknown = sorted(set(query) - set(PARAMS))
    if unknown:
        raise ParamError(f"unknown parameter(s) {unknown}; allowed: {', '.join(PARAMS)}")
    one: dict[str, str] = {}
    for name, values in query.items():
        if name not in ("state", "outcome"):
            one[name] = _one(values, name)

    states: set[str] = set()
    for name in ("state", "outcome"):
        for value in query.get(name, ()):
            for part in value.split(","):
                part = part.strip()
                if part not in {s.value for s in JobState}:
                    raise ParamError(f"unknown {name} {part[:64]!r}; allowed: {_STATES}")
                states.add(part)

    pool = one.get("pool")
    agent = one.get("agent_name")
    if pool is not None and agent is not None and pool != agent:
        raise ParamError("'pool' and 'agent_name' name the same filter; give one")
    worker = one.get("worker")
    worker_id = one.get("worker_id")
    if worker is not None and worker_id is not None and worker != worker_id:
        raise ParamError("'worker' and 'worker_id' name the same filter; give one")

    since = parse_time("since", one["since"], now) if "since" in one else None
    until = parse_time("until", one["until"], now) if "until" in one else None
    if since is not None and until is not None and since >= until:
        raise ParamError(f"'since' ({since:.3f}) must be before 'until' ({until:.3f})")

    fmt = one.get("format", "json")
    if fmt not in FORMATS:
        raise ParamError(f"unknown format {fmt[:64]!r}; allowed: {', '.join(FORMATS)}")
    limit: int | None = None if fmt != "json" else DEFAULT_LIMIT
    if "limit" in one:
        try:
            limit = int(one["limit"])
        except ValueError:
            limit = 0
        if fmt == "json" and not 1 <= limit <= MAX_LIMIT:
            raise ParamError(f"'limit' must be an integer >= 1 and <= {MAX_LIMIT} (one page)")
        if limit < 1:
            raise ParamError("'limit' must be an integer >= 1 (records to export)")
    try:
        flt = JobFilter(
            states=frozenset(states) if states else None,
            agent_name=pool if pool is not None else agent,
            room=one.get("room"),
            worker_id=worker if worker is not None else worker_id,
            dispatch_id=one.get("dispatch_id"),
            trunk=one.get("trunk"),
            caller=one.get("caller"),
            since=since,
            until=until,
        )
    except InvalidQuery as exc:
        raise ParamError(str(exc)) from None
    return JobQuery(flt, limit, one.get("cursor"), fmt)
