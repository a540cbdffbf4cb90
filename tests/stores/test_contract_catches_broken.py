"""The contract suite catches broken backends: each fake here is the memory
backend with one deliberate defect (the kind a new SQL backend could have),
and the contract check written for that defect must fail on it with an
AssertionError. Weakening a check until it passes its fake fails these tests.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import pytest
from stores.broken_usage import USAGE_FAKES
from stores.contract import CHECKS, Backend

from trunkline.stores import (
    MAX_LIMIT,
    BadCursor,
    JobFilter,
    JobRecord,
    MemoryHistory,
    Page,
    check_limit,
    cursor_after,
    decode_cursor,
    order_key,
    page_of,
)


def fake(cls: type[MemoryHistory], *, bounded: bool = True, **kw: object) -> Backend:
    def make(capacity: int | None) -> MemoryHistory:
        return cls(capacity=10_000 if capacity is None else capacity, **kw)

    return Backend(cls.__name__ + "".join(f"-{v}" for v in kw.values()), make, bounded)


class IgnoresField(MemoryHistory):
    """Drops one filter field (a WHERE clause forgotten) in query and count."""

    def __init__(self, capacity: int, field: str) -> None:
        super().__init__(capacity)
        self.field = field

    def _weak(self, flt: JobFilter) -> JobFilter:
        return dataclasses.replace(flt, **{self.field: None})

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        return await super().query(self._weak(flt), limit=limit, cursor=cursor)

    async def count(self, flt: JobFilter) -> int:
        return await super().count(self._weak(flt))


class FirstConditionOnly(MemoryHistory):
    """Applies only the first filter field set (OR-ish building of WHERE)."""

    @staticmethod
    def _first(flt: JobFilter) -> JobFilter:
        for f in dataclasses.fields(flt):
            if getattr(flt, f.name) is not None:
                return JobFilter(**{f.name: getattr(flt, f.name)})
        return flt

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        return await super().query(self._first(flt), limit=limit, cursor=cursor)

    async def count(self, flt: JobFilter) -> int:
        return await super().count(self._first(flt))


class NullCountWhenEmpty(MemoryHistory):
    """count is SUM(1): NULL, not 0, when nothing matches."""

    async def count(self, flt: JobFilter) -> int:
        n = await super().count(flt)
        return n or None  # type: ignore[return-value]


class _CursorAt(MemoryHistory):
    """Query with a different rule for where a cursor's page starts."""

    def _start(self, key: tuple[float, str]) -> int:
        raise NotImplementedError

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        start = len(self._keys) if cursor is None else self._start(decode_cursor(cursor))
        return page_of((r for r in self._newest_first(start) if flt.matches(r)), limit)


class CursorRepeatsLast(_CursorAt):
    """`<=` instead of `<`: each page starts with the previous page's last record."""

    def _start(self, key: tuple[float, str]) -> int:
        return bisect.bisect_right(self._keys, key)


class CursorSkipsOne(_CursorAt):
    """Off by one the other way: the record right after the cursor is lost."""

    def _start(self, key: tuple[float, str]) -> int:
        return max(bisect.bisect_left(self._keys, key) - 1, 0)


class CursorIgnoresJobId(_CursorAt):
    """Cursor on ended_at alone: the rest of a tie group is skipped."""

    def _start(self, key: tuple[float, str]) -> int:
        return bisect.bisect_left(self._keys, (key[0], ""))


class CursorOnLastPage(MemoryHistory):
    """Always hands out a cursor for a non-empty page, even the last."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        page = await super().query(flt, limit=limit, cursor=cursor)
        if page.records and page.next_cursor is None:
            return Page(page.records, cursor_after(page.records[-1]))
        return page


class OffsetCursor(MemoryHistory):
    """LIMIT/OFFSET pagination: newer records shift every later page."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        offset = 0 if cursor is None else int(cursor)
        matching = [r for r in self._newest_first(len(self._keys)) if flt.matches(r)]
        rest = matching[offset:]
        more = len(rest) > limit
        return Page(tuple(rest[:limit]), str(offset + limit) if more else None)


class PagesOldestFirst(MemoryHistory):
    """Each page's records come out oldest first (ORDER BY ... ASC inside)."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        page = await super().query(flt, limit=limit, cursor=cursor)
        return Page(page.records[::-1], page.next_cursor)


class TiesAscending(MemoryHistory):
    """Breaks ended_at ties by job_id ascending, against the cursor's order."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        page = await super().query(flt, limit=limit, cursor=cursor)
        ordered = sorted(page.records, key=lambda r: (-(r.ended_at or 0.0), r.job_id))
        return Page(tuple(ordered), page.next_cursor)


class ClampsLimit(MemoryHistory):
    """Silently clamps a bad limit instead of refusing it."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        return await super().query(flt, limit=max(1, min(limit, MAX_LIMIT)), cursor=cursor)


class LenientCursor(MemoryHistory):
    """Reads a cursor it cannot decode as 'from the start'."""

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        try:
            return await super().query(flt, limit=limit, cursor=cursor)
        except BadCursor:
            return await super().query(flt, limit=limit)


def _with_list_trace(r: JobRecord) -> JobRecord:
    copy = dataclasses.replace(r)
    object.__setattr__(copy, "trace", list(copy.trace))
    return copy


class MutableTrace(MemoryHistory):
    """Hands out records whose trace is a list the reader can change."""

    async def get(self, job_id: str) -> JobRecord | None:
        r = await super().get(job_id)
        return None if r is None else _with_list_trace(r)

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        page = await super().query(flt, limit=limit, cursor=cursor)
        return Page(tuple(_with_list_trace(r) for r in page.records), page.next_cursor)


class LastWriteWins(MemoryHistory):
    """INSERT OR REPLACE: a re-added job id overwrites the stored record."""

    async def add(self, records: Sequence[JobRecord]) -> None:
        for r in records:
            if r.job_id in self._by_id:
                old = self._by_id.pop(r.job_id)
                self._keys.remove((old.ended_at or 0.0, old.job_id))
            await super().add([r])


class _Transforms(MemoryHistory):
    change: Callable[[JobRecord], JobRecord]

    async def add(self, records: Sequence[JobRecord]) -> None:
        await super().add([self.change(r) for r in records])


class MillisecondTimes(_Transforms):
    """Stores times rounded to milliseconds (a TIMESTAMP(3) column)."""

    @staticmethod
    def change(r: JobRecord) -> JobRecord:
        return dataclasses.replace(r, created_at=round(r.created_at, 3))


class DropsSip(_Transforms):
    """Forgets the SIP call (a column left out of the INSERT)."""

    @staticmethod
    def change(r: JobRecord) -> JobRecord:
        return dataclasses.replace(r, sip=None)


class NotAtomic(MemoryHistory):
    """Stores a batch record by record, so a bad record leaves half a batch."""

    async def add(self, records: Sequence[JobRecord]) -> None:
        for r in records:
            await super().add([r])


class NeverEvicts(MemoryHistory):
    """Claims to be bounded but keeps everything."""

    def __init__(self, capacity: int) -> None:
        super().__init__(10**9)


class EvictsFirstAdded(MemoryHistory):
    """Evicts in insertion order (by rowid) instead of by age."""

    def __init__(self, capacity: int) -> None:
        super().__init__(10**9)
        self.limit = capacity
        self.arrival: list[str] = []

    async def add(self, records: Sequence[JobRecord]) -> None:
        new = [r.job_id for r in records if r.job_id not in self._by_id]
        await super().add(records)
        self.arrival += new
        while len(self.arrival) > self.limit:
            gone = self._by_id.pop(self.arrival.pop(0))
            self._keys.remove((gone.ended_at or 0.0, gone.job_id))


class TimeOnEnded(MemoryHistory):
    """since/until bound ended_at (the order column) instead of created_at."""

    @staticmethod
    def _on_end(flt: JobFilter) -> Callable[[JobRecord], bool]:
        rest = dataclasses.replace(flt, since=None, until=None)

        def match(r: JobRecord) -> bool:
            end = r.ended_at or 0.0
            return (
                rest.matches(r)
                and (flt.since is None or end >= flt.since)
                and (flt.until is None or end < flt.until)
            )

        return match

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        check_limit(limit)
        start = (
            len(self._keys)
            if cursor is None
            else bisect.bisect_left(self._keys, decode_cursor(cursor))
        )
        match = self._on_end(flt)
        return page_of((r for r in self._newest_first(start) if match(r)), limit)

    async def count(self, flt: JobFilter) -> int:
        match = self._on_end(flt)
        return sum(1 for r in self._newest_first(len(self._keys)) if match(r))


class DropsAwkwardRecords(MemoryHistory):
    """Skips records whose text holds NUL (a column that cannot take it)."""

    async def add(self, records: Sequence[JobRecord]) -> None:
        await super().add([r for r in records if "\x00" not in r.room])


class PrunesByCreated(MemoryHistory):
    """Age retention on created_at instead of ended_at."""

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        n = 0
        if before is not None:
            old = [r for r in self._by_id.values() if r.created_at < before]
            for r in old:
                del self._by_id[r.job_id]
                self._keys.remove(order_key(r))
            n = len(old)
        return n + await super().prune(keep=keep)


class PruneKeepsOldest(MemoryHistory):
    """Size retention drops the newest records instead of the oldest."""

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        n = await super().prune(before=before)
        if keep is not None and len(self._keys) > keep:
            for _, job_id in self._keys[keep:]:
                del self._by_id[job_id]
            n += len(self._keys) - keep
            del self._keys[keep:]
        return n


class PruneReportsNothing(MemoryHistory):
    """Prunes correctly but always returns 0."""

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        await super().prune(before=before, keep=keep)
        return 0


FILTER_FIELDS = [f.name for f in dataclasses.fields(JobFilter)]

FAKES: list[tuple[Backend, str]] = [
    *((fake(IgnoresField, field=name), "check_each_filter_alone") for name in FILTER_FIELDS),
    (fake(FirstConditionOnly), "check_filters_combined"),
    (fake(NullCountWhenEmpty), "check_empty_store"),
    (fake(CursorRepeatsLast), "check_pagination"),
    (fake(CursorSkipsOne), "check_pagination"),
    (fake(CursorOnLastPage), "check_pagination"),
    (fake(CursorIgnoresJobId), "check_order_and_ties"),
    (fake(OffsetCursor), "check_pagination_stable_under_newer_records"),
    (fake(PagesOldestFirst), "check_order_and_ties"),
    (fake(TiesAscending), "check_order_and_ties"),
    (fake(ClampsLimit), "check_limit_bounds"),
    (fake(LenientCursor), "check_bad_cursor"),
    (fake(MutableTrace), "check_records_are_immutable"),
    (fake(LastWriteWins), "check_first_write_wins"),
    (fake(MillisecondTimes), "check_round_trip"),
    (fake(DropsSip), "check_round_trip"),
    (fake(NotAtomic), "check_rejects_live_records"),
    (fake(NeverEvicts), "check_capacity_evicts_oldest"),
    (fake(EvictsFirstAdded), "check_capacity_evicts_oldest"),
    (fake(TimeOnEnded), "check_time_range_any_job_length"),
    (fake(DropsAwkwardRecords), "check_awkward_text"),
    (fake(PrunesByCreated), "check_prune"),
    (fake(PruneKeepsOldest), "check_prune"),
    (fake(PruneReportsNothing), "check_prune"),
    *USAGE_FAKES,  # scale events and the usage report
]


async def contract_failures(backend: Backend) -> dict[str, BaseException]:
    """Runs every contract check; the checks that failed, with their error."""
    failed: dict[str, BaseException] = {}
    for check in CHECKS:
        try:
            await check(backend)
        except pytest.skip.Exception:
            pass
        except Exception as e:
            failed[check.__name__] = e
    return failed


@pytest.mark.parametrize(("backend", "caught_by"), FAKES, ids=[b.name for b, _ in FAKES])
async def test_broken_backend_fails_the_contract(backend: Backend, caught_by: str) -> None:
    """A backend with this one defect fails the check written for it, with an
    AssertionError (not a crash of the check)."""
    failed = await contract_failures(backend)
    assert caught_by in failed, f"{backend.name} passed {caught_by}; failed only {sorted(failed)}"
    assert isinstance(failed[caught_by], AssertionError), repr(failed[caught_by])


def test_every_check_catches_some_defect() -> None:
    """Each contract check is the one that catches at least one fake: a check
    that catches nothing is either redundant or has lost its teeth."""
    assert {caught_by for _, caught_by in FAKES} == {c.__name__ for c in CHECKS}
