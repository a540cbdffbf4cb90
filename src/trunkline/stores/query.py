"""What a history query asks for and what it gets back: filters, order, pages.

Every store lists records in one order, newest-ended first: by `ended_at`
descending, ties broken by `job_id` descending, so the order is total and the
same in every backend. A page's cursor is the position of its last record in
that order (keyset pagination, not an offset): the next page starts strictly
after it, so records added between two page requests that ended later than the
cursor (the usual case: new jobs) never shift a page, duplicate a record or
open a gap. A record filed late with an older `ended_at` than the cursor shows
up on a later page.

Cursors are opaque to clients (URL-safe text); backends read them with
`decode_cursor`. Helpers here (`order_key`, `cursor_after`, `check_limit`) are
what every backend uses, so they agree on order, cursor form and limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from trunkline.core import JobState
from trunkline.stores.records import JobRecord

MAX_LIMIT = 1000  # records per page; a bigger page is a bulk export, not a query

_STATES = frozenset(s.value for s in JobState)
_CURSOR_VERSION = 1


class InvalidQuery(ValueError):
    """A query the store cannot answer as asked: the message says which part
    and what is allowed (the REST layer answers 400 with it)."""


class BadCursor(InvalidQuery):
    """A cursor this store did not hand out (malformed, truncated or edited)."""


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which records a query returns; every field set must match (AND), None
    matches anything.

    `states`: any of these `JobState` values. `trunk` and `caller` (the SIP From
    number) match only records with a SIP call. `since` (inclusive) and `until`
    (exclusive) bound `created_at`, Unix seconds. Raises `InvalidQuery` for an
    unknown or empty set of states or a non-finite time."""

    states: frozenset[str] | None = None
    agent_name: str | None = None
    room: str | None = None
    worker_id: str | None = None
    dispatch_id: str | None = None
    trunk: str | None = None
    caller: str | None = None
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.states is not None:
            states = frozenset(self.states)  # a set or list passed in is copied, frozen
            if not states:
                raise InvalidQuery("'states' is empty; pass None to match every state")
            unknown = states - _STATES
            if unknown:
                allowed = ", ".join(s.value for s in JobState)
                raise InvalidQuery(f"unknown state(s) {sorted(unknown)}; allowed: {allowed}")
            object.__setattr__(self, "states", states)
        for name in ("since", "until"):
            t = getattr(self, name)
            if t is not None and not math.isfinite(t):
                raise InvalidQuery(f"'{name}' must be a finite Unix time, got {t!r}")

    def matches(self, r: JobRecord) -> bool:
        """True if `r` passes every condition set (live snapshots included)."""
        if self.states is not None and r.state not in self.states:
            return False
        if self.agent_name is not None and r.agent_name != self.agent_name:
            return False
        if self.room is not None and r.room != self.room:
            return False
        if self.worker_id is not None and r.worker_id != self.worker_id:
            return False
        if self.dispatch_id is not None and r.dispatch_id != self.dispatch_id:
            return False
        if self.trunk is not None and (r.sip is None or r.sip.trunk != self.trunk):
            return False
        if self.caller is not None and (r.sip is None or r.sip.from_number != self.caller):
            return False
        if self.since is not None and r.created_at < self.since:
            return False
        return self.until is None or r.created_at < self.until


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a query, in store order. `next_cursor` fetches the page after
    it; it is None exactly when no further record matched at query time."""

    records: tuple[JobRecord, ...]
    next_cursor: str | None = None


def order_key(r: JobRecord) -> tuple[float, str]:
    """`r`'s position in store order (sorting by it descending gives that order).
    Raises ValueError for a record that has not ended: stores keep ended jobs only."""
    if r.ended_at is None:
        raise ValueError(
            f"job {r.job_id!r} has not ended (state {r.state!r}): the history keeps ended jobs"
        )
    return (r.ended_at, r.job_id)


def cursor_after(r: JobRecord) -> str:
    """The cursor of the page that starts right after `r`."""
    ended_at, job_id = order_key(r)
    raw = json.dumps([_CURSOR_VERSION, ended_at, job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The `order_key` a cursor points after; the next page holds records whose
    key is strictly less. Raises `BadCursor` for anything `cursor_after` did not
    make."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        value = json.loads(raw.decode())
    except (binascii.Error, UnicodeError, ValueError):
        raise BadCursor(f"malformed cursor {cursor[:40]!r}: pass back a next_cursor") from None
    if (
        isinstance(value, list)
        and len(value) == 3
        and type(value[0]) is int
        and value[0] == _CURSOR_VERSION
        and type(value[1]) in (float, int)  # not bool; json gives int for "5"
        and math.isfinite(value[1])
        and isinstance(value[2], str)
    ):
        return float(value[1]), value[2]
    raise BadCursor(f"malformed cursor {cursor[:40]!r}: pass back a next_cursor")


def check_limit(limit: int) -> int:
    """`limit` if it is a page size a store accepts (1..MAX_LIMIT), else raises
    `InvalidQuery`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"'limit' must be an integer in [1, {MAX_LIMIT}], got {limit!r}")
    return limit


def page_of(matching: Iterable[JobRecord], limit: int) -> Page:
    """A page of the first `limit` of `matching` (records that pass the filter,
    in store order, past the cursor) with the cursor for the rest. Reads at most
    one record past the page, to know whether there is a rest: a SQL backend
    passes the rows of `LIMIT limit + 1`."""
    out: list[JobRecord] = []
    for r in matching:
        if len(out) == limit:
            return Page(tuple(out), cursor_after(out[-1]))
        out.append(r)
    return Page(tuple(out), None)
