"""A deadline queue with lazy cancellation.

The scheduler never cancels a timer: each entry carries a token (for example
the job's offer sequence number when the offer was sent) and the handler
ignores entries whose token no longer matches. That keeps arming O(log n) and
cancelling free. The adapter asks `next_deadline()` after every event and
arms one real timer for it.
"""

from __future__ import annotations

import heapq
from typing import Any


class TimerQueue:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any, int]] = []
        self._seq = 0

    def arm(self, when: float, kind: str, key: Any, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, key, token))

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[str, Any, int] | None:
        """The earliest entry due at `now`, or None."""
        if self._heap and self._heap[0][0] <= now:
            _, _, kind, key, token = heapq.heappop(self._heap)
            return kind, key, token
        return None

    def __len__(self) -> int:
        return len(self._heap)
