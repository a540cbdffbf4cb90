"""The state-machine helper: both table shapes, the one IllegalTransition, diagrams."""

from __future__ import annotations

import enum

import pytest

from trunkline.common.fsm import (
    EventTable,
    IllegalTransition,
    Transitions,
    blocks,
    mermaid,
    replace_blocks,
)


class Door(enum.Enum):
    SHUT = "shut"
    OPEN = "open"
    GONE = "gone"


class Push(enum.Enum):
    PUSH = "someone pushes"
    KICK = "someone kicks"


D, P = Door, Push
GRAPH = Transitions(D.SHUT, {D.SHUT: {D.OPEN}, D.OPEN: {D.SHUT, D.GONE}, D.GONE: ()})
EVENTS = EventTable(
    D.SHUT,
    {
        (D.SHUT, P.PUSH): D.OPEN,
        (D.SHUT, P.KICK): D.GONE,
        (D.OPEN, P.PUSH): D.OPEN,
        (D.OPEN, P.KICK): D.GONE,
    },
)


def test_transitions_check_allows_listed_moves_only() -> None:
    """check() returns for a listed move and raises IllegalTransition naming the entity."""
    GRAPH.check("door 1", D.SHUT, D.OPEN)
    with pytest.raises(IllegalTransition, match=r"^door 1: gone -> open is not allowed$") as err:
        GRAPH.check("door 1", D.GONE, D.OPEN)
    assert (err.value.entity, err.value.state, err.value.change) == ("door 1", D.GONE, D.OPEN)
    assert isinstance(err.value, RuntimeError)


def test_transitions_must_list_every_state() -> None:
    """A state missing from the table fails when the table is declared."""
    with pytest.raises(ValueError, match="lacks states: GONE"):
        Transitions(D.SHUT, {D.SHUT: {D.OPEN}, D.OPEN: {D.SHUT}})


def test_transitions_are_a_dict_of_frozensets() -> None:
    """A table reads as a plain state -> frozenset mapping (fast membership tests)."""
    assert GRAPH[D.OPEN] == frozenset({D.SHUT, D.GONE})
    assert isinstance(GRAPH[D.GONE], frozenset)


def test_event_table_step_returns_the_next_state_or_raises() -> None:
    """step() follows the table; an event the state does not accept raises."""
    assert EVENTS.step("door 1", D.SHUT, P.PUSH) is D.OPEN
    with pytest.raises(IllegalTransition, match=r"door 1 in state GONE: PUSH \(someone pushes\)"):
        EVENTS.step("door 1", D.GONE, P.PUSH)


def test_event_table_needs_a_way_out_of_its_initial_state() -> None:
    """An event table whose initial state has no transition is a declaration bug."""
    with pytest.raises(ValueError, match="no transition out of GONE"):
        EventTable(D.GONE, {(D.SHUT, P.PUSH): D.OPEN})


def test_mermaid_of_transitions() -> None:
    """A graph renders in enum order, with the initial and the final states marked."""
    assert mermaid(GRAPH) == (
        "stateDiagram-v2\n"
        "    [*] --> SHUT\n"
        "    SHUT --> OPEN\n"
        "    OPEN --> SHUT\n"
        "    OPEN --> GONE\n"
        "    GONE --> [*]"
    )


def test_mermaid_of_an_event_table_labels_arrows_with_events() -> None:
    """Events moving along the same arrow share one label; self-loops are drawn."""
    assert mermaid(EVENTS) == (
        "stateDiagram-v2\n"
        "    [*] --> SHUT\n"
        "    SHUT --> OPEN : PUSH\n"
        "    SHUT --> GONE : KICK\n"
        "    OPEN --> OPEN : PUSH\n"
        "    OPEN --> GONE : KICK\n"
        "    GONE --> [*]"
    )


def test_a_state_with_only_self_loops_is_final() -> None:
    """A state that can only stay where it is counts as final in the diagram."""
    table = EventTable(D.SHUT, {(D.SHUT, P.PUSH): D.OPEN, (D.OPEN, P.PUSH): D.OPEN})
    assert mermaid(table).endswith("    OPEN --> OPEN : PUSH\n    OPEN --> [*]")


DOC = """# Doors

<!-- fsm:door -->
stale
<!-- /fsm:door -->

text
"""


def test_replace_blocks_fills_named_blocks_and_keeps_the_rest() -> None:
    """A block between markers becomes a mermaid code fence; the text around it stays."""
    out = replace_blocks(DOC, {"door": "stateDiagram-v2\n    [*] --> SHUT"})
    assert out == DOC.replace("stale\n", "```mermaid\nstateDiagram-v2\n    [*] --> SHUT\n```\n")
    assert blocks(out) == {"door": "```mermaid\nstateDiagram-v2\n    [*] --> SHUT\n```\n"}
    assert replace_blocks(out, {"door": "stateDiagram-v2\n    [*] --> SHUT"}) == out


def test_replace_blocks_refuses_an_unknown_name() -> None:
    """A block naming no known table raises instead of leaving a stale diagram."""
    with pytest.raises(KeyError, match="door"):
        replace_blocks(DOC, {})


def test_markers_must_match() -> None:
    """A block closed with another name's marker is not a block."""
    assert blocks("<!-- fsm:a -->\nx\n<!-- /fsm:b -->\n") == {}
