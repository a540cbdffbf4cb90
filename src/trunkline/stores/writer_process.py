"""The history writer process: a SQL store's writes, off the server's GIL.

`python -m trunkline.stores.writer_process` is started by the server
(`trunkline.stores.offload.OffloadedStore`), never by hand. It opens the
store its parent names and performs, one at a time and in order, the writes
the parent sends: batches of ended job records, scale events, retention,
the usage report (which fills the store's cache). The parent keeps its own
connection for reads. Building SQL rows and running SQLite cost a busy
server 10-15 % of its CPU per job cycle (docs/benchmarks.md); here it runs
on another core, and the server pays only for `records.to_wire` and a pipe
write.

The pipe (the child's stdin and stdout) is private to the two processes.
A frame is a header (`HEADER`: operation or status, request number,
payload length) and a payload: records travel as `marshal`led wire tuples,
everything else as pickles. Both formats trust the peer, which is the
server that started this process; nothing else can write to the pipe. The
store's address (a PostgreSQL URL may hold a password) comes through the
pipe too, never on the command line, which other users may read.

Records of a batch come in `PART` frames followed by the `ADD` that stores
them in one transaction. If the parent goes away (stdin ends: it exited or
was killed), what it sent is committed before this process exits, so a
`kill -9` of the server loses only records it had not sent yet. SIGINT and
SIGTERM are ignored: a Ctrl-C or a service manager's stop reaches the whole
process group, and the parent closes this process itself, after its last
batch.
"""

from __future__ import annotations

import asyncio
import marshal
import pickle
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

from trunkline.stores.protocol import HistoryStore, StoreError
from trunkline.stores.query import InvalidQuery
from trunkline.stores.records import JobRecord, from_wire

HEADER = struct.Struct("<BII")  # op or status, request number, payload length
OPEN, PART, ADD, EVENTS, PRUNE, USAGE, CLOSE = range(7)
OK, ERR = 0, 1
# Exceptions a caller expects by type; any other failure is a StoreError.
ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "InvalidQuery": InvalidQuery,
}

StoreSpec = tuple[str, str, int]  # backend, path or URL, schema version


def spec_of(store: HistoryStore) -> StoreSpec:
    """What names `store` to the writer process (`make_store` builds it
    back there). Raises StoreError for a store it cannot run."""
    from trunkline.stores.postgres import PostgresHistory
    from trunkline.stores.sqlite import SqliteHistory

    if isinstance(store, SqliteHistory):
        return ("sqlite", str(store.path), store.schema_version)
    if isinstance(store, PostgresHistory):
        return ("postgresql", store.url, store.schema_version)
    raise StoreError(f"a {type(store).__name__} cannot write in the history writer process")


def make_store(spec: StoreSpec) -> HistoryStore:
    """The store `spec` names (`spec_of`)."""
    backend, where, version = spec
    if backend == "sqlite":
        from trunkline.stores.sqlite import SqliteHistory

        return SqliteHistory(where, schema_version=version)
    if backend == "postgresql":
        from trunkline.stores.postgres import PostgresHistory

        return PostgresHistory(where, schema_version=version)
    raise StoreError(f"the history writer process cannot run a {backend!r} store")


def error_payload(exc: BaseException) -> bytes:
    name = type(exc).__name__
    kind = name if name in ERRORS else "StoreError"
    return pickle.dumps((kind, str(exc) or name))


def _read_exactly(src: BinaryIO, n: int) -> bytes | None:
    """`n` bytes of `src`, or None at its end (also mid-frame)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class _Child:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.loop = asyncio.new_event_loop()
        self.store: HistoryStore | None = None
        self.parts: dict[int, list[JobRecord]] = {}

    def reply(self, status: int, seq: int, payload: bytes) -> None:
        try:
            self.out.write(HEADER.pack(status, seq, len(payload)) + payload)
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the parent is gone; what it sent is still committed

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def open_store(self, spec: StoreSpec) -> None:
        store = make_store(spec)
        self.run(store.open())
        self.store = store

    def handle(self, op: int, seq: int, payload: bytes) -> bool:
        """Perform one frame; False after CLOSE."""
        if op == PART:
            self.parts.setdefault(seq, []).extend(map(from_wire, marshal.loads(payload)))
            return True
        try:
            result = self._perform(op, seq, payload)
        except Exception as exc:
            self.reply(ERR, seq, error_payload(exc))
        else:
            self.reply(OK, seq, pickle.dumps(result))
        return op != CLOSE

    def _perform(self, op: int, seq: int, payload: bytes) -> Any:
        if op == OPEN:
            self.open_store(pickle.loads(payload))
            return None
        store = self.store
        if op == CLOSE:
            self.flush()
            return None
        if store is None:
            raise StoreError("the history writer process has no store open")
        calls: dict[int, Callable[[], Awaitable[Any]]] = {
            ADD: lambda: store.add(self.parts.pop(seq, [])),
            EVENTS: lambda: store.add_scale_events(pickle.loads(payload)),
            PRUNE: lambda: store.prune(**pickle.loads(payload)),
            USAGE: lambda: store.usage(**pickle.loads(payload)),
        }
        call = calls.get(op)
        if call is None:
            raise StoreError(f"unknown history writer operation {op}")
        return self.run(call())

    def flush(self) -> None:
        """Store every record received and close the store (parent gone or done)."""
        store, self.store = self.store, None
        if store is None:
            return
        try:
            for seq in sorted(self.parts):
                try:
                    self.run(store.add(self.parts.pop(seq)))
                except Exception as exc:  # the parent is gone: say it here
                    print(f"trunkline history writer: batch lost: {exc}", file=sys.stderr)
        finally:
            self.run(store.close())


def main(src: BinaryIO | None = None, out: BinaryIO | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    src = src or sys.stdin.buffer
    child = _Child(out or sys.stdout.buffer)
    try:
        while True:
            head = _read_exactly(src, HEADER.size)
            if head is None:
                break  # the parent is gone
            op, seq, n = HEADER.unpack(head)
            payload = _read_exactly(src, n)
            if payload is None or not child.handle(op, seq, payload):
                break
        child.flush()
    finally:
        child.loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
