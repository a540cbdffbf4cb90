"""State machines as data: two table shapes, one `IllegalTransition`, Mermaid diagrams.

Theory of operation: every entity (job, replica, SIP transaction, SIP call) keeps
its own `enum.Enum` of states and declares its one table with this module, once,
at import time:

- `Transitions`: state -> the states it may move to (jobs, replicas). The caller
  decides the next state; `check(entity, old, new)` refuses one the table does
  not list.
- `EventTable`: (state, event) -> next state (SIP transactions and calls). The
  event decides the next state; `step(entity, state, event)` returns it, or
  refuses an event the state has no entry for.

Both are dicts once built, so lookups on hot paths stay C-speed, and both raise
the one `IllegalTransition` (a bug in the caller: input from the network or a
user is refused or absorbed before it gets here). A table must not be changed
after it is declared.

`mermaid(table)` renders either shape as a Mermaid ``stateDiagram-v2``, and
`replace_blocks` rewrites the diagrams between ``<!-- fsm:NAME -->`` and
``<!-- /fsm:NAME -->`` in a Markdown text: that is how the diagrams in docs/ are
kept equal to the code (tests/test_docs_diagrams.py checks them and, run as a
script, regenerates them).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = [
    "EventTable",
    "IllegalTransition",
    "Transitions",
    "blocks",
    "mermaid",
    "replace_blocks",
]

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A state change the entity's table does not allow (a bug in the caller).

    `entity` names the thing ("job j1"), `state` is where it was, and `change`
    is the refused target state (`Transitions`) or event (`EventTable`)."""

    def __init__(self, message: str, entity: str, state: enum.Enum, change: enum.Enum) -> None:
        super().__init__(message)
        self.entity, self.state, self.change = entity, state, change


class Transitions(dict[S, frozenset[S]]):
    """State -> the states it may move to. Every member of the enum must be a
    key (a terminal state maps to nothing), so a state added to the enum but
    forgotten in the table fails at import, not at run time."""

    initial: S

    def __init__(self, initial: S, table: Mapping[S, Iterable[S]]) -> None:
        super().__init__((state, frozenset(targets)) for state, targets in table.items())
        self.initial = initial
        missing = [s.name for s in type(initial) if s not in self]
        if missing:
            raise ValueError(f"transition table lacks states: {', '.join(missing)}")

    def check(self, entity: str, old: S, new: S) -> None:
        """Return if `old -> new` is in the table; raise `IllegalTransition` otherwise."""
        if new not in self[old]:
            raise IllegalTransition(
                f"{entity}: {old.value} -> {new.value} is not allowed", entity, old, new
            )

    def edges(self) -> Iterator[tuple[S, S, tuple[enum.Enum, ...]]]:
        """Every transition as (from, to, no labels), in enum order."""
        order = list(type(self.initial))
        for src in order:
            for dst in order:
                if dst in self[src]:
                    yield src, dst, ()


class EventTable(dict[tuple[S, E], S], Generic[S, E]):
    """(state, event) -> next state. A pair not in the table is an event the
    state does not accept."""

    initial: S

    def __init__(self, initial: S, table: Mapping[tuple[S, E], S]) -> None:
        super().__init__(table)
        self.initial = initial
        if table and not any(src is initial for src, _ in table):
            raise ValueError(f"event table has no transition out of {initial.name}")

    def step(self, entity: str, state: S, event: E) -> S:
        """The state `event` moves `state` to; raise `IllegalTransition` if none."""
        nxt = self.get((state, event))
        if nxt is None:
            raise IllegalTransition(
                f"{entity} in state {state.name}: {event.name} ({event.value}) is not allowed",
                entity,
                state,
                event,
            )
        return nxt

    def edges(self) -> Iterator[tuple[S, S, tuple[E, ...]]]:
        """Every (from, to) pair with the events that move along it, in enum order."""
        states = list(type(self.initial))
        labels: dict[tuple[S, S], list[E]] = {}
        for (src, event), dst in self.items():
            labels.setdefault((src, dst), []).append(event)
        for src in states:
            for dst in states:
                events = labels.get((src, dst))
                if events:
                    events.sort(key=_enum_index)
                    yield src, dst, tuple(events)


def _enum_index(member: enum.Enum) -> int:
    return list(type(member)).index(member)


def mermaid(table: Transitions[Any] | EventTable[Any, Any]) -> str:
    """The table as a Mermaid ``stateDiagram-v2`` (no trailing newline).

    States are their enum names; ``[*] -->`` marks the initial state and
    ``--> [*]`` every final one (a state with no transition to another state);
    an `EventTable` labels each arrow with the names of its events."""
    lines = ["stateDiagram-v2", f"    [*] --> {table.initial.name}"]
    seen: list[enum.Enum] = [table.initial]
    leaves: set[enum.Enum] = set()
    for src, dst, events in table.edges():
        label = f" : {', '.join(e.name for e in events)}" if events else ""
        lines.append(f"    {src.name} --> {dst.name}{label}")
        seen += [s for s in (src, dst) if s not in seen]
        if src is not dst:
            leaves.add(src)
    finals = sorted((s for s in seen if s not in leaves), key=_enum_index)
    lines += [f"    {s.name} --> [*]" for s in finals]
    return "\n".join(lines)


_BLOCK = re.compile(
    r"(?P<open><!-- fsm:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close><!-- /fsm:(?P=name) -->)",
    re.DOTALL,
)


def blocks(text: str) -> dict[str, str]:
    """The diagram blocks of a Markdown text: name -> what is between its markers."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def replace_blocks(text: str, diagrams: Mapping[str, str]) -> str:
    """`text` with every ``<!-- fsm:NAME -->`` block holding ``diagrams[NAME]`` as a
    fenced ``mermaid`` code block. Raise KeyError for a block whose name has no
    diagram (a typo must not leave a stale diagram in place)."""

    def fill(m: re.Match[str]) -> str:
        body = f"```mermaid\n{diagrams[m['name']]}\n```\n"
        return m["open"] + body + m["close"]

    return _BLOCK.sub(fill, text)
