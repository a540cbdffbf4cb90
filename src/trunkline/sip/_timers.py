"""A deadline queue: set, clear and pop due keys in time order.

Theory of operation: a binary heap of (when, sequence, key) with lazy deletion.
The dict ``_live`` holds each key's current deadline; heap entries whose deadline
no longer matches are stale and skipped. Setting a key again replaces its
deadline. Ties fire in the order they were set, so runs are deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TimerQueue"]

K = TypeVar("K", bound=Hashable)


class TimerQueue(Generic[K]):
    """Deadlines keyed by ``K``; at most one deadline per key."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._seq = 0

    def set(self, key: K, when: float) -> None:
        """Arm (or re-arm) ``key`` to fire at ``when``."""
        self._seq += 1
        self._live[key] = (when, self._seq)
        heapq.heappush(self._heap, (when, self._seq, key))

    def clear(self, key: K) -> None:
        """Disarm ``key``; a no-op if it is not armed."""
        self._live.pop(key, None)

    def pop_due(self, now: float) -> list[K]:
        """Remove and return every key due at ``now``, earliest first."""
        due: list[K] = []
        while self._heap and self._heap[0][0] <= now:
            when, seq, key = heapq.heappop(self._heap)
            if self._live.get(key) == (when, seq):
                del self._live[key]
                due.append(key)
        return due

    def next_deadline(self) -> float | None:
        """The earliest armed deadline, or None."""
        while self._heap:
            when, seq, key = self._heap[0]
            if self._live.get(key) == (when, seq):
                return when
            heapq.heappop(self._heap)
        return None

    def __len__(self) -> int:
        return len(self._live)
