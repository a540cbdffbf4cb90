"""The scheduler's counters for metrics, and where a forgotten pool's go.

Counters are keyed by agent name (and a label): requests, ended jobs by
outcome, offers by answer. A pool made for an agent name nobody configured is
dropped once idle (`Scheduler`); its counters stay under its own name while it
is among the last `FORGOTTEN_KEPT` such names (a typo'd agent name's refusals
stay visible), then they are folded into `FORGOTTEN_POOL`, so totals stay
right while made-up names cannot grow the metrics without bound.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from trunkline.core.states import TERMINAL

# The pool label that the counters of long-forgotten pools are folded into;
# no agent name can look like it (`agent_name_problem`).
FORGOTTEN_POOL = "(unconfigured)"
FORGOTTEN_KEPT = 100  # forgotten agent names whose counters keep their own label

_OUTCOMES = tuple(sorted(s.value for s in TERMINAL))
_ANSWERS = ("accept", "reject", "reject_terminate", "late", "timeout", "withdrawn")


class Counters:
    """`requested[pool]`, `ended[(pool, outcome)]`, `offer_answers[(pool, answer)]`."""

    __slots__ = ("_forgotten", "ended", "offer_answers", "requested")

    def __init__(self) -> None:
        self.requested: Counter[str] = Counter()
        self.ended: Counter[tuple[str, str]] = Counter()
        self.offer_answers: Counter[tuple[str, str]] = Counter()
        self._forgotten: OrderedDict[str, None] = OrderedDict()

    def forgotten(self, name: str) -> None:
        """The pool of `name` was dropped: its counters stay under its name
        while it is among the last `FORGOTTEN_KEPT` forgotten, then fold."""
        recent = self._forgotten
        recent[name] = None
        recent.move_to_end(name)
        if len(recent) > FORGOTTEN_KEPT:
            self._fold(recent.popitem(last=False)[0])

    def revived(self, name: str) -> None:
        """A pool of `name` exists again: its counters go on under its name."""
        self._forgotten.pop(name, None)

    def _fold(self, name: str) -> None:
        moved = self.requested.pop(name, 0)
        if moved:
            self.requested[FORGOTTEN_POOL] += moved
        for counter, labels in ((self.ended, _OUTCOMES), (self.offer_answers, _ANSWERS)):
            for label in labels:
                n = counter.pop((name, label), 0)
                if n:
                    counter[(FORGOTTEN_POOL, label)] += n
