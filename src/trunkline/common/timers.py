"""One deadline queue for every sans-IO state machine (scheduler, SIP layer).

Theory of operation: a binary heap of ``(when, sequence, key, token)``. Nothing
here reads a clock: callers pass ``now``, and the adapter arms one real timer
for :meth:`TimerQueue.next_deadline` after every event. Ties fire in the order
they were armed, so runs are deterministic. A queue offers two ways to use it,
and one key should be used one way only:

- **Keyed** (:meth:`~TimerQueue.set` / :meth:`~TimerQueue.clear`): at most one
  deadline per key; setting a key again replaces its deadline, clearing it
  disarms it. A dict holds each key's live entry, and heap entries that no
  longer match it are skipped. The SIP layer uses this: its timers are re-armed
  and disarmed as transactions change state.
- **Tokened** (:meth:`~TimerQueue.arm`): fire-and-forget, never cancelled, any
  number of entries per key. Each entry carries a token (for example the job's
  offer sequence number when the offer was sent) and the handler ignores an
  entry whose token no longer matches its own record. Arming costs one heap
  push and no dict work, which is why the scheduler's hot path uses it.

:meth:`~TimerQueue.pop` returns the earliest due entry of either kind, one at a
time, so an entry armed while handling another, and due at the same ``now``,
still runs in the same pass; :meth:`~TimerQueue.pop_due` takes every key due at
``now`` in one batch.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TimerQueue"]

K = TypeVar("K", bound=Hashable)


class TimerQueue(Generic[K]):
    """Deadlines for keys ``K``; see the module docstring for the two ways to use it."""

    __slots__ = ("_heap", "_live", "armed")

    def __init__(self) -> None:
        # token None marks a keyed entry, live only while `_live[key]` is its seq.
        self._heap: list[tuple[float, int, K, int | None]] = []
        self._live: dict[K, int] = {}
        # Entries armed so far (read-only outside): each entry's sequence number
        # for ties, and, unchanged since `next_deadline()` was read, proof that
        # no earlier deadline has appeared since (entries only ever leave).
        self.armed = 0

    def arm(self, key: K, when: float, token: int = 0) -> None:
        """Add a tokened entry firing at ``when``; it cannot be cancelled, so the
        handler must compare ``token`` with its own record when it fires."""
        self.armed += 1
        heapq.heappush(self._heap, (when, self.armed, key, token))

    def set(self, key: K, when: float) -> None:
        """Arm (or re-arm) keyed ``key`` to fire at ``when``, replacing its deadline."""
        self.armed += 1
        self._live[key] = self.armed
        heapq.heappush(self._heap, (when, self.armed, key, None))

    def clear(self, key: K) -> None:
        """Disarm keyed ``key``; a no-op if it is not armed."""
        self._live.pop(key, None)

    def pop(self, now: float) -> tuple[K, int] | None:
        """Remove and return the earliest entry due at ``now`` as ``(key, token)``
        (token 0 for a keyed entry), or None when nothing is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key, token = heapq.heappop(heap)
            if token is not None:
                return key, token
            if self._live.get(key) == seq:
                del self._live[key]
                return key, 0
        return None

    def pop_due(self, now: float) -> list[K]:
        """Remove and return every key due at ``now``, earliest first."""
        due: list[K] = []
        while (entry := self.pop(now)) is not None:
            due.append(entry[0])
        return due

    def next_deadline(self) -> float | None:
        """The earliest pending deadline, or None."""
        heap = self._heap
        while heap:
            when, seq, key, token = heap[0]
            if token is not None or self._live.get(key) == seq:
                return when
            heapq.heappop(heap)  # a cleared or replaced keyed entry
        return None
