"""Pages of jobs live and ended together: the query side of `GET /v1/jobs`.

Theory of operation
-------------------
A listing shows the live jobs first, oldest first (by `created_at`, then job
id), then the ended ones in store order, newest-ended first. Its cursor says
which of the two parts the next page starts in and where:

* `L<key>`: in the live part, after the live job whose (created_at, job_id)
  is `key`; live jobs are read afresh for every page, so one that ended
  meanwhile is not skipped: it shows up in the ended part (and may so be
  listed twice, once live and once ended, when it ended between two pages);
* `E` or `E<store cursor>`: in the ended part, from the newest or after the
  store cursor (`trunkline.stores.query`), keyset pagination with the same
  guarantees as the store's.

`next_cursor` is None exactly when nothing further matched at query time. The
filter is the store's `JobFilter`, applied to live jobs here and to ended ones
by the store (its indexes); nothing above filters.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from trunkline.stores import BadCursor, JobFilter, JobRecord, Page, check_limit

_LIVE = "L"
_ENDED = "E"

EndedPage = Callable[[JobFilter, int, str | None], Awaitable[Page]]


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of a listing: live jobs (as snapshots) then ended ones."""

    jobs: tuple[JobRecord, ...]
    next_cursor: str | None = None


def _live_cursor(r: JobRecord) -> str:
    raw = json.dumps([r.created_at, r.job_id], separators=(",", ":")).encode()
    return _LIVE + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _live_key(text: str) -> tuple[float, str]:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        value = json.loads(raw.decode())
    except (binascii.Error, UnicodeError, ValueError):
        value = None
    if (
        isinstance(value, list)
        and len(value) == 2
        and type(value[0]) in (float, int)
        and math.isfinite(value[0])
        and isinstance(value[1], str)
    ):
        return float(value[0]), value[1]
    raise BadCursor("malformed cursor: pass back a next_cursor")


def check_cursor(cursor: str | None) -> None:
    """Raises `BadCursor` for a cursor no listing handed out (the ended
    part's store cursor is checked by the store)."""
    if cursor is None:
        return
    if cursor.startswith(_LIVE):
        _live_key(cursor[1:])
    elif not cursor.startswith(_ENDED):
        raise BadCursor("malformed cursor: pass back a next_cursor")


async def page(
    live: Iterable[JobRecord],
    ended: EndedPage,
    flt: JobFilter,
    limit: int,
    cursor: str | None,
) -> JobPage:
    """A page of up to `limit` jobs from `live` (snapshots of the live jobs
    that may match: every one is checked against `flt` here) and from `ended`
    (the history's page function), starting at `cursor`. Raises
    `InvalidQuery` for a bad limit and `BadCursor` for a bad cursor."""
    check_limit(limit)
    check_cursor(cursor)
    out: list[JobRecord] = []
    store_cursor: str | None = None
    if cursor is None or cursor.startswith(_LIVE):
        after = None if cursor is None else _live_key(cursor[1:])
        matching = sorted(
            (
                r
                for r in live
                if flt.matches(r) and (after is None or (r.created_at, r.job_id) > after)
            ),
            key=lambda r: (r.created_at, r.job_id),
        )
        out.extend(matching[:limit])
        if len(matching) > limit:
            return JobPage(tuple(out), _live_cursor(out[-1]))
    else:
        store_cursor = cursor[1:] or None
    room = limit - len(out)
    if room == 0:
        # The page is full of live jobs: peek whether any ended one follows.
        peek = await ended(flt, 1, None)
        return JobPage(tuple(out), _ENDED if peek.records else None)
    rest = await ended(flt, room, store_cursor)
    out.extend(rest.records)
    return JobPage(tuple(out), None if rest.next_cursor is None else _ENDED + rest.next_cursor)
