"""The history-store contract: checks every `HistoryStore` backend must pass.

Each check is a plain async function taking a `Backend` (a factory for fresh,
unopened stores plus what the backend can do) and raising AssertionError when
the backend breaks the contract (`raises` below, not pytest.raises, so that a
missing exception is an AssertionError too). `test_contract.py` runs every check in `CHECKS`
against every backend; `test_contract_catches_broken.py` runs them against
deliberately broken fakes to show they catch each defect.

Expected results come from the data built here (sorted by hand, filtered with
`JobFilter.matches`, which `test_query.py` pins on its own), never from the
backend under test.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import pytest

from trunkline.stores import (
    MAX_LIMIT,
    BadCursor,
    HistoryStore,
    InvalidQuery,
    JobFilter,
    JobRecord,
    Page,
    SipCallRecord,
    TraceRecord,
    cursor_after,
)


@dataclass(frozen=True)
class Backend:
    """How the contract gets stores of one backend. `make(capacity)` returns a
    fresh, empty, unopened store (`capacity` None: the backend's default);
    `bounded`: it honours `capacity` by evicting the oldest records."""

    name: str
    make: Callable[[int | None], HistoryStore]
    bounded: bool = False


Check = Callable[[Backend], Awaitable[None]]

BASE = 1_700_000_000.123456789  # fractional on purpose: times must round-trip exactly
STATES = ("succeeded", "failed", "no_capacity", "cancelled", "rejected", "worker_lost")
POOLS = ("support", "sales", "billing")
CALLERS = ("+4930111", "+4930222")
TRUNKS = ("carrier-a", "carrier-b")


def record(n: int, **changes: object) -> JobRecord:
    """Job number `n` of the test data: every filterable field varies with `n`
    on a different cycle, so each filter picks a different, partial subset;
    even `n` came in over SIP. Created at BASE + 10 n, ended 5-7 s later."""
    created = BASE + 10 * n
    sip = (
        SipCallRecord(
            call_id=f"call-{n}@edge",
            from_number=CALLERS[1 if n % 3 == 0 else 0],
            to_number="+49800123",
            trunk=TRUNKS[n % 4 // 2],
            final_status=200 if n % 3 else 486,
        )
        if n % 2 == 0
        else None
    )
    base = JobRecord(
        job_id=f"J{n:04d}",
        dispatch_id=f"D{n // 2:04d}",
        agent_name=POOLS[n % 3],
        room=f"room-{n % 4}",
        metadata=f'{{"n": {n}}}',
        attributes=(("lk.n", str(n)),),
        state=STATES[n % 6],
        reason="" if n % 6 == 0 else f"reason {n}",
        worker_id=None if n % 5 == 0 else f"W{n % 5}",
        created_at=created,
        placed_at=created + 0.25,
        running_at=created + 0.5,
        ended_at=created + 5 + n % 3,
        queue_wait_s=0.25,
        max_wait_s=5.0,
        trace=(TraceRecord(created, "requested"), TraceRecord(created + 5 + n % 3, "ended")),
        sip=sip,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def dataset(count: int, seed: int = 8) -> list[JobRecord]:
    """`count` records in a shuffled (but fixed) order: stores must sort."""
    records = [record(n) for n in range(count)]
    random.Random(seed).shuffle(records)
    return records


def newest_first(records: Sequence[JobRecord]) -> list[str]:
    """Job ids in store order, worked out by hand: ended_at desc, then job_id desc."""
    return [
        r.job_id for r in sorted(records, key=lambda r: (r.ended_at or 0.0, r.job_id), reverse=True)
    ]


@contextmanager
def raises(kind: type[BaseException], match: str = "") -> Iterator[None]:
    """Like pytest.raises, but a missing exception is an AssertionError (the
    contract's one failure type, which the broken-fake tests look for)."""
    try:
        yield
    except kind as e:
        if not re.search(match, str(e)):
            raise AssertionError(f"{kind.__name__} {str(e)!r} does not match {match!r}") from e
        return
    raise AssertionError(f"did not raise {kind.__name__}")


@asynccontextmanager
async def opened(backend: Backend, capacity: int | None = None) -> AsyncIterator[HistoryStore]:
    store = backend.make(capacity)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def filled(store: HistoryStore, records: Sequence[JobRecord], batch: int = 7) -> None:
    """Add `records` in several batches, as the dispatcher's writer does."""
    for i in range(0, len(records), batch):
        await store.add(records[i : i + batch])


async def all_pages(store: HistoryStore, flt: JobFilter, limit: int) -> list[Page]:
    """Every page of a query, following next_cursor; checks each page's shape."""
    pages: list[Page] = []
    cursor: str | None = None
    while True:
        page = await store.query(flt, limit=limit, cursor=cursor)
        assert isinstance(page, Page)
        assert isinstance(page.records, tuple)
        assert len(page.records) <= limit, f"page of {len(page.records)} over limit {limit}"
        pages.append(page)
        if page.next_cursor is None:
            return pages
        assert page.records, "a page with a next_cursor must hold records"
        assert len(pages) <= 1000, "next_cursor never ends"
        cursor = page.next_cursor


def ids(pages: Sequence[Page]) -> list[str]:
    return [r.job_id for p in pages for r in p.records]


# ------------------------------------------------------------------ checks


async def check_empty_store(backend: Backend) -> None:
    """A new store holds nothing: get is None, a query is one empty last page."""
    async with opened(backend) as store:
        assert await store.get("J0000") is None
        assert await store.query(JobFilter(), limit=10) == Page((), None)
        assert await store.count(JobFilter()) == 0
        await store.add([])
        assert await store.count(JobFilter()) == 0


async def check_round_trip(backend: Backend) -> None:
    """Every field of a record, trace and SIP call included, comes back equal
    (exact floats, unicode, None where allowed), from get and from query."""
    full = JobRecord(
        job_id="AJ_full",
        dispatch_id="AD_full",
        agent_name="support",
        room="sip-abc",
        metadata='{"caller": "Zoë", "n": 1}',
        attributes=(("a", "1"), ("lk.sip.callID", "x@y"), ("ü", "ß")),
        state="succeeded",
        reason="agent hung up",
        worker_id="AW_1",
        replica_id="support-7f9c",
        created_at=BASE,
        placed_at=BASE + 0.000001,
        running_at=BASE + 1 / 3,
        ended_at=BASE + 61.5,
        queue_wait_s=0.000123456789,
        max_wait_s=7.5,
        trace=(
            TraceRecord(BASE, "requested"),
            TraceRecord(BASE + 0.0001, "offered", "AW_1"),
            TraceRecord(BASE + 0.0002, "accepted", "AW_1", "identity agent-1"),
            TraceRecord(BASE + 61.5, "succeeded", "AW_1", "agent hung up"),
        ),
        sip=SipCallRecord("abc@10.0.0.1", "+4930111", "+49800123", "carrier-a", 200),
    )
    bare = JobRecord(
        job_id="AJ_bare",
        agent_name="",
        room="r",
        state="no_capacity",
        created_at=BASE,
        ended_at=BASE + 5,
        max_wait_s=5.0,
        sip=SipCallRecord("c@h", "", "", "carrier-b", None),
    )
    minimal = JobRecord(
        job_id="AJ_min",
        agent_name="p",
        room="r",
        state="cancelled",
        created_at=BASE,
        ended_at=BASE,
        max_wait_s=0.0,
    )
    async with opened(backend) as store:
        await store.add([full, bare, minimal])
        for want in (full, bare, minimal):
            got = await store.get(want.job_id)
            assert got is not None, f"{want.job_id} not found after add"
            assert isinstance(got, JobRecord)
            for f in dataclasses.fields(JobRecord):
                assert getattr(got, f.name) == getattr(want, f.name), f"field {f.name} differs"
            assert got == want
        page = await store.query(JobFilter(), limit=10)
        assert page.records == (full, bare, minimal)
        assert await store.get("AJ_unknown") is None


async def check_records_are_immutable(backend: Backend) -> None:
    """Records a store hands out cannot be changed: frozen, and hashable all
    the way down (tuples, not lists or dicts)."""
    async with opened(backend) as store:
        await store.add([record(1), record(2)])
        got = await store.get("J0002")
        assert got is not None
        listed = (await store.query(JobFilter(), limit=10)).records
        for r in (got, *listed):
            try:
                hash(r)
            except TypeError as e:  # a field (trace, attributes, sip) is mutable
                raise AssertionError(f"record {r.job_id} is not hashable: {e}") from None
            assert isinstance(r.trace, tuple)
            assert isinstance(r.attributes, tuple)
            for f in dataclasses.fields(JobRecord):
                with raises(AttributeError):
                    setattr(r, f.name, getattr(r, f.name))


async def check_first_write_wins(backend: Backend) -> None:
    """Adding a job id the store holds (later, or twice in one batch) keeps
    the first record: nothing is replaced, nothing listed twice."""
    first = record(3)
    again = dataclasses.replace(first, reason="rewritten", state="failed")
    twin = dataclasses.replace(record(4), reason="second of the batch")
    async with opened(backend) as store:
        await store.add([first])
        await store.add([again])
        await store.add([record(4), twin])
        assert await store.get(first.job_id) == first
        assert await store.get("J0004") == record(4)
        page = await store.query(JobFilter(), limit=10)
        assert [r.job_id for r in page.records] == ["J0004", "J0003"]
        assert page.records[1] == first
        assert await store.count(JobFilter()) == 2
        assert await store.count(JobFilter(states=frozenset({"failed"}))) == 0


async def check_rejects_live_records(backend: Backend) -> None:
    """A batch holding a job that has not ended raises ValueError and stores
    none of the batch."""
    live = dataclasses.replace(record(5), ended_at=None, state="running")
    async with opened(backend) as store:
        with raises(ValueError, match="not ended"):
            await store.add([record(6), live])
        assert await store.get("J0006") is None
        assert await store.count(JobFilter()) == 0


# Every JobFilter field alone, each picking a partial subset of dataset(48).
SINGLE_FILTERS = (
    JobFilter(states=frozenset({"failed", "no_capacity"})),
    JobFilter(agent_name="sales"),
    JobFilter(room="room-1"),
    JobFilter(worker_id="W2"),
    JobFilter(dispatch_id="D0007"),
    JobFilter(trunk="carrier-b"),
    JobFilter(caller="+4930222"),
    JobFilter(since=BASE + 100),
    JobFilter(until=BASE + 200),
)

COMBINED_FILTERS = (
    JobFilter(states=frozenset({"succeeded", "failed"}), agent_name="support"),
    JobFilter(room="room-2", since=BASE + 60, until=BASE + 400),
    JobFilter(trunk="carrier-a", caller="+4930111", agent_name="billing"),
    JobFilter(worker_id="W1", dispatch_id="D0003"),
    JobFilter(states=frozenset({"failed"}), room="room-1", worker_id="W3", since=BASE),
    JobFilter(caller="+4930222", until=BASE + 250),
)


async def _check_filters(backend: Backend, filters: Sequence[JobFilter]) -> None:
    data = dataset(48)
    async with opened(backend) as store:
        await filled(store, data)
        for flt in filters:
            want = newest_first([r for r in data if flt.matches(r)])
            assert want, f"test data: {flt} matches nothing"
            assert len(want) < len(data), f"test data: {flt} matches everything"
            got = ids(await all_pages(store, flt, limit=4))
            assert got == want, f"query({flt}) returned the wrong records"
            assert await store.count(flt) == len(want), f"count({flt}) is wrong"


async def check_each_filter_alone(backend: Backend) -> None:
    """Each filter field on its own selects exactly the matching records
    (query over all pages, and count); `since` inclusive, `until` exclusive."""
    assert {f.name for f in dataclasses.fields(JobFilter)} == {
        name for flt in SINGLE_FILTERS for name in _set_fields(flt)
    }, "SINGLE_FILTERS must exercise every JobFilter field"
    await _check_filters(backend, SINGLE_FILTERS)
    # half-open time range, pinned on its edges
    async with opened(backend) as store:
        await store.add([record(n) for n in range(5)])
        edge = JobFilter(since=BASE + 10, until=BASE + 30)
        got = ids([await store.query(edge, limit=10)])
        assert got == ["J0002", "J0001"]


async def check_filters_combined(backend: Backend) -> None:
    """Several filter fields together select the records matching all of them
    (AND), each combination narrower than its parts; no match is an empty last page."""
    for flt in COMBINED_FILTERS:
        assert len(_set_fields(flt)) >= 2
    data = dataset(48)
    for flt in COMBINED_FILTERS:
        matching = [r for r in data if flt.matches(r)]
        for name in _set_fields(flt):
            alone = JobFilter(**{name: getattr(flt, name)})
            assert len(matching) < sum(alone.matches(r) for r in data), (
                f"test data: {flt} is no narrower than its part {name}"
            )
    await _check_filters(backend, COMBINED_FILTERS)
    async with opened(backend) as store:
        await filled(store, data)
        none = JobFilter(agent_name="support", caller="+4930111")  # support: n % 3 == 0
        assert not [r for r in data if none.matches(r)]
        assert await store.query(none, limit=5) == Page((), None)
        assert await store.count(none) == 0


def _set_fields(flt: JobFilter) -> list[str]:
    return [f.name for f in dataclasses.fields(flt) if getattr(flt, f.name) is not None]


async def check_pagination(backend: Backend) -> None:
    """Following next_cursor visits every record once, in order, over many
    pages, for any limit; the last page (even a full one) has no cursor."""
    data = dataset(23)
    want = newest_first(data)
    async with opened(backend) as store:
        await filled(store, data)
        for limit in (5, 1, 22, 23, MAX_LIMIT):
            pages = await all_pages(store, JobFilter(), limit)
            assert ids(pages) == want, f"limit {limit}: records lost, repeated or out of order"
            assert len(pages) == -(-len(data) // limit), f"limit {limit}: wrong number of pages"
            assert all(len(p.records) == limit for p in pages[:-1])
        flt = JobFilter(agent_name="sales")
        want_sales = newest_first([r for r in data if flt.matches(r)])
        assert ids(await all_pages(store, flt, limit=2)) == want_sales
        # a valid cursor past the oldest record: an empty last page
        oldest = min(data, key=lambda r: r.ended_at or 0.0)
        after_all = await store.query(JobFilter(), limit=5, cursor=cursor_after(oldest))
        assert after_all == Page((), None)


async def check_pagination_stable_under_newer_records(backend: Backend) -> None:
    """Records ending later than the cursor, added between page requests, do
    not shift, repeat or hide the records of the pages still to come."""
    data = dataset(23)
    want = newest_first(data)
    newer = [record(n) for n in range(100, 107)]  # each ends after every record of data
    async with opened(backend) as store:
        await filled(store, data)
        seen: list[str] = []
        added: list[JobRecord] = []
        page = await store.query(JobFilter(), limit=5)
        seen += [r.job_id for r in page.records]
        while page.next_cursor is not None:
            assert len(seen) <= len(data), "records repeated"
            if len(added) < len(newer):
                added.append(newer[len(added)])
                await store.add(added[-1:])
            page = await store.query(JobFilter(), limit=5, cursor=page.next_cursor)
            seen += [r.job_id for r in page.records]
        assert len(added) >= 3, "test data: too few pages to add records between"
        assert seen == want, "records added between pages changed the pages after"
        assert await store.count(JobFilter()) == len(data) + len(added)
        fresh = ids([await store.query(JobFilter(), limit=len(added))])
        assert fresh == newest_first(added), "the added records are not the newest"


async def check_order_and_ties(backend: Backend) -> None:
    """Store order is ended_at descending (not created_at, not insertion),
    ties broken by job_id descending, and a cursor inside a tie group loses
    none of it."""
    t = BASE + 1000
    tied = [
        record(n, created_at=t - n, ended_at=t + (n % 3)) for n in (7, 3, 11, 5, 9, 1, 4, 8, 2, 10)
    ]
    # created first, ended last: created order is not store order
    late = record(0, created_at=t - 500, ended_at=t + 50)
    data = [*tied, late]
    want = newest_first(data)
    assert want[0] == late.job_id
    async with opened(backend) as store:
        await filled(store, data, batch=3)
        for limit in (1, 2, 3, 4):
            assert ids(await all_pages(store, JobFilter(), limit)) == want, f"limit {limit}"


async def check_limit_bounds(backend: Backend) -> None:
    """A limit outside 1..MAX_LIMIT raises InvalidQuery (a ValueError); both
    bounds themselves are accepted."""
    assert issubclass(InvalidQuery, ValueError)
    async with opened(backend) as store:
        await store.add([record(1)])
        for bad in (0, -1, MAX_LIMIT + 1, 10**9):
            with raises(InvalidQuery):
                await store.query(JobFilter(), limit=bad)
        for good in (1, MAX_LIMIT):
            assert len((await store.query(JobFilter(), limit=good)).records) == 1


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


async def check_bad_cursor(backend: Backend) -> None:
    """A cursor the store did not hand out (garbage, truncated, edited, of
    another version) raises BadCursor, a ValueError; it is never read as 'from
    the start'."""
    assert issubclass(BadCursor, ValueError)
    async with opened(backend) as store:
        await filled(store, dataset(6))
        good = (await store.query(JobFilter(), limit=2)).next_cursor
        assert good is not None
        bad = [
            "",
            "!!!",
            "not a cursor",
            good[:-3],
            good + "AAAA",
            _b64("[]"),
            _b64("{}"),
            _b64('[1, "soon", "J0001"]'),
            _b64('[1, NaN, "J0001"]'),
            _b64("[1, 1700000000.5, 7]"),
            _b64('[99, 1700000000.5, "J0001"]'),
            _b64('[true, 1700000000.5, "J0001"]'),
        ]
        for cursor in bad:
            with raises(BadCursor):
                await store.query(JobFilter(), limit=2, cursor=cursor)


async def check_capacity_evicts_oldest(backend: Backend) -> None:
    """A bounded store past its capacity drops the oldest-ended records (not
    the first added): get, query and count no longer see them."""
    if not backend.bounded:
        pytest.skip(f"{backend.name} is unbounded")
    data = dataset(12)  # shuffled: insertion order is not age
    keep = newest_first(data)[:5]
    async with opened(backend, capacity=5) as store:
        await filled(store, data, batch=4)
        assert await store.count(JobFilter()) == 5
        assert ids(await all_pages(store, JobFilter(), 2)) == keep
        for r in data:
            got = await store.get(r.job_id)
            assert (got is not None) == (r.job_id in keep), f"{r.job_id} kept or evicted wrongly"
        # older than everything held: filed and evicted at once
        await store.add([record(-1)])
        assert await store.get("J-001") is None
        assert ids([await store.query(JobFilter(), limit=10)]) == keep


async def check_time_range_any_job_length(backend: Backend) -> None:
    """`since`/`until` bound created_at whatever a job's length: a job created
    in the range but ended days after it, or ended at its creation, is in;
    one created before `since` but ended inside is out."""
    t = BASE + 10_000
    spans = (0.0, 0.5, 3600.0, 3 * 86400.0, 30.0, 7200.0)
    data = [
        record(n, created_at=t + 100 * n, ended_at=t + 100 * n + spans[n % len(spans)])
        for n in range(24)
    ]
    ranges = (
        JobFilter(since=t + 450, until=t + 1250),
        JobFilter(since=t + 1000),
        JobFilter(until=t + 700),
        JobFilter(since=t + 300, until=t + 301),  # one job, created at its start
        JobFilter(since=t + 2350, until=t + 2400),  # none
        JobFilter(since=t + 500, until=t + 1500, agent_name="sales"),
    )
    async with opened(backend) as store:
        await filled(store, data, batch=5)
        for flt in ranges:
            want = newest_first([r for r in data if flt.matches(r)])
            assert ids(await all_pages(store, flt, limit=3)) == want, f"query({flt})"
            assert await store.count(flt) == len(want), f"count({flt})"


def awkward(n: int) -> JobRecord:
    """Record `n` with text no SQL column takes as is: NUL, a lone
    surrogate, astral characters, a long metadata string."""
    odd = f"a\x00b\ud800c\U0001f600{n}"
    return record(
        n,
        job_id=f"J{n:04d}-\u00e9\x00",
        room=odd,
        metadata=odd * 2000,
        reason=odd,
        worker_id=odd,
        attributes=((odd, odd),),
        trace=(TraceRecord(BASE, odd, odd, odd),),
        sip=SipCallRecord(odd, odd, odd, odd, 603),
    )


def _same_text(got: object, want: object) -> bool:
    """Equal, or equal once NUL and lone surrogates are U+FFFD (what SQL
    columns store); containers compared item by item."""
    if isinstance(want, str):
        return got in (want, _cleaned(want))
    if isinstance(want, tuple) and isinstance(got, tuple) and len(got) == len(want):
        return all(_same_text(g, w) for g, w in zip(got, want, strict=True))
    if dataclasses.is_dataclass(want) and type(got) is type(want):
        return all(
            _same_text(getattr(got, f.name), getattr(want, f.name))
            for f in dataclasses.fields(want)
        )
    return got == want


def _cleaned(s: str) -> str:
    return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in s)


async def check_awkward_text(backend: Backend) -> None:
    """A record whose text holds NUL, lone surrogates or astral characters is
    stored with the rest of its batch, found by get and query, and comes back
    equal (or with just those characters replaced by U+FFFD); the trace and
    attributes come back exactly."""
    batch = [record(1), awkward(2), record(3)]
    async with opened(backend) as store:
        try:
            await store.add(batch)
        except Exception as e:  # a refused batch is the defect this check is for
            raise AssertionError(f"a batch with awkward text was refused: {e!r}") from e
        assert await store.count(JobFilter()) == 3, "the batch was not stored whole"
        listed = {r.job_id: r for r in (await store.query(JobFilter(), limit=10)).records}
        assert set(listed) >= {"J0001", "J0003"}
        odd = next((r for k, r in listed.items() if k.startswith("J0002")), None)
        assert odd is not None, "the awkward record is not listed"
        want = awkward(2)
        for f in dataclasses.fields(JobRecord):
            assert _same_text(getattr(odd, f.name), getattr(want, f.name)), f"field {f.name}"
        assert odd.trace == want.trace
        assert odd.attributes == want.attributes
        assert await store.get(odd.job_id) == odd
        assert await store.get(want.job_id) == odd, "get by the job id as it was added"


async def check_prune(backend: Backend) -> None:
    """prune(before=t) removes exactly the records that ended before t;
    prune(keep=n) then removes the oldest past the newest n; each returns how
    many it removed, and get, query and count agree with what is left."""
    data = dataset(30)
    order = newest_first(data)  # newest first
    by_id = {r.job_id: r for r in data}
    async with opened(backend) as store:
        assert await store.prune(before=BASE + 10**6, keep=0) == 0  # empty store
        await filled(store, data)
        assert await store.prune() == 0
        cut = BASE + 150.5  # between records: ends are created + 5..7
        older = [r.job_id for r in data if (r.ended_at or 0.0) < cut]
        assert 0 < len(older) < len(data), "test data: cut removes none or all"
        assert await store.prune(before=cut) == len(older)
        left = [j for j in order if j not in older]
        assert ids(await all_pages(store, JobFilter(), 7)) == left
        assert await store.get(older[0]) is None
        assert await store.get(left[-1]) == by_id[left[-1]]
        assert await store.prune(before=cut) == 0  # nothing more is that old
        assert await store.prune(keep=len(left) + 5) == 0
        assert await store.prune(keep=6) == len(left) - 6
        assert ids(await all_pages(store, JobFilter(), 4)) == left[:6]
        assert await store.count(JobFilter()) == 6
        assert await store.prune(before=cut, keep=0) == 6
        assert await store.count(JobFilter()) == 0


CHECKS: tuple[Check, ...] = (
    check_empty_store,
    check_round_trip,
    check_records_are_immutable,
    check_first_write_wins,
    check_rejects_live_records,
    check_each_filter_alone,
    check_filters_combined,
    check_pagination,
    check_pagination_stable_under_newer_records,
    check_order_and_ties,
    check_limit_bounds,
    check_bad_cursor,
    check_capacity_evicts_oldest,
    check_time_range_any_job_length,
    check_awkward_text,
    check_prune,
)

# Scale events and the usage report (they use the helpers above).
from stores.contract_usage import USAGE_CHECKS  # noqa: E402

CHECKS = (*CHECKS, *USAGE_CHECKS)
