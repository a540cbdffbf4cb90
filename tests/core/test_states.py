"""The job and replica tables: declared with the one fsm helper, consistent with
the fast-path attributes, and raising the one IllegalTransition."""

from __future__ import annotations

import pytest

import trunkline.core
from trunkline.common.fsm import IllegalTransition
from trunkline.core.autoscale import REPLICA_TRANSITIONS, IllegalReplicaTransition
from trunkline.core.states import ACTIVE, TERMINAL, TRANSITIONS, JobState, check_transition
from trunkline.sip import transaction
from trunkline.sip.calls import IllegalCallTransition

S = JobState


def test_every_illegal_transition_name_is_the_one_class() -> None:
    """Jobs, replicas, SIP transactions and calls all raise the same exception type."""
    assert trunkline.core.IllegalTransition is IllegalTransition
    assert IllegalReplicaTransition is IllegalTransition
    assert IllegalCallTransition is IllegalTransition
    assert transaction.IllegalTransition is IllegalTransition
    assert issubclass(IllegalTransition, RuntimeError)


def test_fast_path_attributes_mirror_the_tables() -> None:
    """JobState.allowed/active/terminal, read on the scheduler's hot path, equal the tables."""
    for state in JobState:
        assert state.allowed == TRANSITIONS[state]
        assert state.active is (state in ACTIVE)
        assert state.terminal is (state in TERMINAL)


def test_terminal_states_are_exactly_the_dead_ends() -> None:
    """A job state is terminal iff no transition leaves it, for jobs and replicas alike."""
    assert {s for s, out in TRANSITIONS.items() if not out} == TERMINAL
    assert TRANSITIONS.initial is S.QUEUED
    assert {s for s, out in REPLICA_TRANSITIONS.items() if not out} == {
        s for s in REPLICA_TRANSITIONS if s.value in ("stopped", "failed")
    }


def test_every_job_state_is_reachable_from_queued() -> None:
    """No state in the table is dead code: each is reachable from a new job."""
    seen, todo = {S.QUEUED}, [S.QUEUED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(JobState)


def test_check_transition_names_the_job_and_both_states() -> None:
    """The slow-path check says which job tried which move."""
    with pytest.raises(IllegalTransition, match=r"^job j7: cancelled -> queued is not allowed$"):
        check_transition("j7", S.CANCELLED, S.QUEUED)
