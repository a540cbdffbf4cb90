"""Jobs exported as CSV or JSON lines: `GET /v1/jobs?format=csv|jsonl`.

Theory of operation: the export is a chunked `StreamResponse` written a page
at a time. Each page (`PAGE` records) is asked of the Dispatcher with the
previous page's `next_cursor`, encoded and written (awaiting the socket, so a
slow reader slows the export instead of filling memory), then dropped: memory
stays at one page whatever the export's size. A page is encoded `SLICE`
records at a time, yielding to the event loop between slices: encoding runs
on the loop (a few ms per 100 records), and an export must not hold up
dispatch for longer than a slice. Every matching job is streamed
(live ones first, then ended ones newest first, as `GET /v1/jobs` lists them)
unless `limit` caps it. A failure after the first bytes went out cannot
become an HTTP error any more: the stream is cut short (the client sees an
incomplete chunked body, never a truncated file that looks whole).

CSV has a header row and the columns of `CSV_COLUMNS`, in that order (new
columns are only ever added at the end); no trace (use JSON lines, which
carry the whole record as `GET /v1/jobs/{id}` shows it, one object a line).
Empty cells are None values. Text cells that a spreadsheet would run as a
formula (starting with `=`, `+`, `-`, `@`, tab or CR) get a leading `'`,
except numbers such as a caller's `+15551234567`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from trunkline.runtime.dispatcher import Dispatcher
from trunkline.server.job_params import JobQuery
from trunkline.server.views import job_json, json_dumps
from trunkline.stores import JobRecord

PAGE = 200  # records per page read from the history
SLICE = 25  # records encoded between two yields to the event loop

CSV_COLUMNS = (
    "job_id",
    "dispatch_id",
    "agent_name",
    "room",
    "state",
    "reason",
    "worker_id",
    "replica_id",
    "created_at",
    "placed_at",
    "running_at",
    "ended_at",
    "queue_wait_s",
    "max_wait_s",
    "sip_call_id",
    "sip_from",
    "sip_to",
    "sip_trunk",
    "sip_final_status",
    "metadata",
    "attributes",
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if text.startswith(_FORMULA) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_row(r: JobRecord) -> list[str]:
    """`r` as the cells of `CSV_COLUMNS`."""
    sip = r.sip
    values = (
        r.job_id,
        r.dispatch_id,
        r.agent_name,
        r.room,
        r.state,
        r.reason,
        r.worker_id,
        r.replica_id,
        r.created_at,
        r.placed_at,
        r.running_at,
        r.ended_at,
        r.queue_wait_s,
        r.max_wait_s,
        None if sip is None else sip.call_id,
        None if sip is None else sip.from_number,
        None if sip is None else sip.to_number,
        None if sip is None else sip.trunk,
        None if sip is None else sip.final_status,
        r.metadata,
        json.dumps(dict(r.attributes), separators=(",", ":")) if r.attributes else "",
    )
    return [_cell(v) for v in values]


def _csv_chunk(records: tuple[JobRecord, ...], header: bool) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    if header:
        w.writerow(CSV_COLUMNS)
    w.writerows(csv_row(r) for r in records)
    return buf.getvalue().encode()


def _jsonl_chunk(records: tuple[JobRecord, ...], header: bool) -> bytes:
    return "".join(json_dumps(job_json(r)) + "\n" for r in records).encode()


async def stream(request: web.Request, d: Dispatcher, q: JobQuery) -> web.StreamResponse:
    """Stream every job of `q.flt` (at most `q.limit`) as `q.format`. The
    first page is read before the response starts, so a bad cursor or an
    invalid query is still an HTTP error (raises `InvalidQuery`)."""
    encode: Callable[[tuple[JobRecord, ...], bool], bytes] = (
        _csv_chunk if q.format == "csv" else _jsonl_chunk
    )
    left = q.limit
    page = await d.query_jobs(
        q.flt, limit=PAGE if left is None else min(PAGE, left), cursor=q.cursor
    )
    resp = web.StreamResponse(
        headers={
            "Content-Type": CONTENT_TYPES[q.format],
            "Content-Disposition": f'attachment; filename="jobs.{q.format}"',
            "Cache-Control": "no-store",
        }
    )
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    header = True
    while True:
        jobs = page.jobs
        for i in range(0, max(len(jobs), 1), SLICE):
            await resp.write(encode(jobs[i : i + SLICE], header))
            header = False
            await asyncio.sleep(0)  # let dispatch run between slices
        if left is not None:
            left -= len(page.jobs)
        if page.next_cursor is None or not page.jobs or left == 0:
            break
        size = PAGE if left is None else min(PAGE, left)
        page = await d.query_jobs(q.flt, limit=size, cursor=page.next_cursor)
    await resp.write_eof()
    return resp
