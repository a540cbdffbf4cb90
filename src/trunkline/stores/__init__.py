"""Job history stores: immutable job records, the store protocol, its backends.

The dispatcher files each ended job as a `JobRecord` into a `HistoryStore`; the
API reads them back with a `JobFilter`, a page at a time. Backends:
`MemoryHistory` (in process), `SqliteHistory` (the default, a file in the data
directory), `PostgresHistory` (shared; the `trunkline[postgres]` extra);
`create_store(config)` picks one. Every backend passes
`tests/stores/contract.py`.
"""

from trunkline.stores.factory import create_store
from trunkline.stores.memory import MemoryHistory
from trunkline.stores.protocol import HistoryStore, StoreError
from trunkline.stores.query import (
    MAX_LIMIT,
    BadCursor,
    InvalidQuery,
    JobFilter,
    Page,
    check_limit,
    cursor_after,
    decode_cursor,
    order_key,
    page_of,
)
from trunkline.stores.records import JobRecord, SipCallRecord, TraceRecord, freeze_attributes

__all__ = [
    "MAX_LIMIT",
    "BadCursor",
    "HistoryStore",
    "InvalidQuery",
    "JobFilter",
    "JobRecord",
    "MemoryHistory",
    "Page",
    "SipCallRecord",
    "StoreError",
    "TraceRecord",
    "check_limit",
    "create_store",
    "cursor_after",
    "decode_cursor",
    "freeze_attributes",
    "order_key",
    "page_of",
]
