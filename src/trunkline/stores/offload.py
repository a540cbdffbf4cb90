"""A SQL store whose writes run in a child process (`[store] writer = "process"`).

`OffloadedStore` wraps a store opened in the server (`inner`, which migrates
the schema at `open`, so an unusable store still stops the server at start,
and answers every read) and hands every write to the history writer
process (`trunkline.stores.writer_process`), started at the first write.
The protocol's semantics are unchanged: `add` returns once the child has
committed the batch, and raises what the store raised there (ValueError for
a live record, `StoreError` for a failing database). Encoding a batch
(`records.to_wire`, `marshal`) yields to the event loop every
slice of records (`_CHUNK`, `_SLICES`), so a big batch never holds dispatch
for long.

If the child dies, the calls waiting on it fail with a `StoreError` naming
its exit code; the history writer keeps those records pending and retries
(with its backoff), and the retry starts a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import pickle
import sys
from collections.abc import Sequence
from typing import Any

from trunkline.stores import writer_process as wp
from trunkline.stores.protocol import HistoryStore, StoreError
from trunkline.stores.query import JobFilter, Page
from trunkline.stores.records import JobRecord, to_wire
from trunkline.stores.usage import ScaleEventRecord, UsageRow

log = logging.getLogger("trunkline.history")

# Records encoded between two turns of the event loop: 16 (~40 us) for the
# small batches of a lightly loaded server, where a request's latency is
# what a slice delays; at most `_SLICES` turns for the big batches of a busy
# one, where every extra turn of a saturated loop costs throughput.
_CHUNK = 16
_SLICES = 8
_CLOSE_TIMEOUT_S = 30.0  # for the child's last batch and its checkpoint


class OffloadedStore:
    """`inner` for reads, a child process running the same store for writes
    (`spec`: how the child is told which, `writer_process.spec_of(inner)`
    unless given)."""

    def __init__(self, inner: HistoryStore, spec: wp.StoreSpec | None = None) -> None:
        self.inner = inner
        self.spec = wp.spec_of(inner) if spec is None else spec
        self.backend = str(getattr(inner, "backend", "sql"))
        self.caches_usage = bool(getattr(inner, "caches_usage", False))
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        # The calls waiting on `_proc`'s replies, by request number.
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._seq = 0
        self._starting = asyncio.Lock()
        self._closed = False

    def describe(self) -> str:
        where = getattr(self.inner, "describe", None)
        return f"{where() if callable(where) else self.backend} (writes in a child process)"

    @property
    def pid(self) -> int | None:
        """The writer process's pid while it runs (benchmarks count its CPU)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def in_flight(self) -> int:
        """Requests sent to the writer process and not answered yet."""
        return len(self._waiting)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(StoreError, TimeoutError):
                    await asyncio.wait_for(self._call(wp.CLOSE, b""), _CLOSE_TIMEOUT_S)
                try:
                    await asyncio.wait_for(proc.wait(), _CLOSE_TIMEOUT_S)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if self._reader is not None:
                await self._reader
        finally:
            await self.inner.close()

    async def _start(self) -> asyncio.subprocess.Process:
        async with self._starting:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                return proc
            if self._closed:
                raise StoreError("the history store is closed")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "trunkline.stores.writer_process",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self._proc, self._waiting = proc, {}
            self._reader = asyncio.create_task(
                self._read(proc, self._waiting), name="trunkline-history-child"
            )
            try:
                await self._request(proc, wp.OPEN, pickle.dumps(self.spec))
            except BaseException:
                # A child that cannot open its store is of no use: the next
                # write starts another (after the history writer's backoff).
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            return proc

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _send(self, proc: asyncio.subprocess.Process, op: int, seq: int, payload: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(wp.HEADER.pack(op, seq, len(payload)) + payload)

    async def _read(
        self, proc: asyncio.subprocess.Process, waiting: dict[int, asyncio.Future[Any]]
    ) -> None:
        """Resolve the waiting calls from the child's replies, until it exits."""
        assert proc.stdout is not None
        out = proc.stdout
        try:
            while True:
                head = await out.readexactly(wp.HEADER.size)
                status, seq, n = wp.HEADER.unpack(head)
                payload = await out.readexactly(n)
                fut = waiting.pop(seq, None)
                if fut is None or fut.done():
                    continue
                if status == wp.OK:
                    fut.set_result(pickle.loads(payload))
                else:
                    kind, message = pickle.loads(payload)
                    fut.set_exception(wp.ERRORS.get(kind, StoreError)(message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it exited
        except Exception:  # a reply that does not decode: the pipe is out of step
            log.exception("history writer process: bad reply; restarting it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            code = await proc.wait()
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(
                        StoreError(f"the history writer process exited (code {code})")
                    )

    async def _call(self, op: int, payload: bytes, parts: Sequence[bytes] = ()) -> Any:
        return await self._request(await self._start(), op, payload, parts)

    async def _request(
        self,
        proc: asyncio.subprocess.Process,
        op: int,
        payload: bytes,
        parts: Sequence[bytes] = (),
    ) -> Any:
        seq = self._next()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting = self._waiting  # `proc`'s: a call never waits on a newer child
        waiting[seq] = fut
        try:
            if proc.returncode is not None:
                raise ConnectionError(f"exit code {proc.returncode}")
            for part in parts:
                self._send(proc, wp.PART, seq, part)
            self._send(proc, op, seq, payload)
            assert proc.stdin is not None
            await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            waiting.pop(seq, None)
            raise StoreError(f"the history writer process is gone: {exc}") from exc
        return await fut

    # ---------------------------------------------------------------- writes

    async def add(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        parts = []
        step = max(_CHUNK, -(-len(records) // _SLICES))
        for i in range(0, len(records), step):
            if i:
                await asyncio.sleep(0)  # let dispatch run between chunks
            parts.append(marshal.dumps([to_wire(r) for r in records[i : i + step]]))
        await self._call(wp.ADD, b"", parts)

    async def add_scale_events(self, events: Sequence[ScaleEventRecord]) -> None:
        if events:
            await self._call(wp.EVENTS, pickle.dumps(list(events)))

    async def prune(self, *, before: float | None = None, keep: int | None = None) -> int:
        return int(await self._call(wp.PRUNE, pickle.dumps({"before": before, "keep": keep})))

    async def usage(
        self, *, since: float, until: float, bucket: str, pool: str | None = None
    ) -> tuple[UsageRow, ...]:
        args = {"since": since, "until": until, "bucket": bucket, "pool": pool}
        return tuple(await self._call(wp.USAGE, pickle.dumps(args)))

    # ----------------------------------------------------------------- reads

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.inner.get(job_id)

    async def query(self, flt: JobFilter, *, limit: int, cursor: str | None = None) -> Page:
        return await self.inner.query(flt, limit=limit, cursor=cursor)

    async def count(self, flt: JobFilter) -> int:
        return await self.inner.count(flt)

    async def scale_events(
        self,
        *,
        pool: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> tuple[ScaleEventRecord, ...]:
        return await self.inner.scale_events(pool=pool, since=since, until=until, limit=limit)
