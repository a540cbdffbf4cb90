"""The one deadline queue: keyed set/clear and tokened arm, in one time order."""

from __future__ import annotations

from trunkline.common.timers import TimerQueue


def test_keyed_set_replaces_and_clear_disarms() -> None:
    """Setting a key again moves its deadline; a cleared key never fires."""
    q: TimerQueue[str] = TimerQueue()
    q.set("a", 5.0)
    q.set("b", 2.0)
    q.set("a", 1.0)
    q.set("c", 3.0)
    q.clear("c")
    q.clear("missing")
    assert q.next_deadline() == 1.0
    assert q.pop_due(10.0) == ["a", "b"]
    assert q.next_deadline() is None
    assert q.pop(10.0) is None


def test_ties_fire_in_the_order_they_were_armed() -> None:
    """Equal deadlines come out in arming order, so runs are deterministic."""
    q: TimerQueue[str] = TimerQueue()
    for key in ("z", "y", "x"):
        q.set(key, 1.0)
    assert q.pop_due(1.0) == ["z", "y", "x"]


def test_nothing_fires_before_its_deadline() -> None:
    """pop and pop_due only return entries due at `now`."""
    q: TimerQueue[str] = TimerQueue()
    q.set("late", 2.0)
    q.arm("later", 3.0, 7)
    assert q.pop(1.99) is None
    assert q.pop_due(1.99) == []
    assert q.pop(2.0) == ("late", 0)
    assert q.next_deadline() == 3.0


def test_tokened_entries_all_fire_with_their_tokens() -> None:
    """Tokened entries are never replaced: each fires once with its token, and the
    handler tells the stale ones by token."""
    q: TimerQueue[tuple[str, str]] = TimerQueue()
    q.arm(("offer", "j1"), 3.0, 1)
    q.arm(("offer", "j1"), 4.0, 2)  # re-offered: the first entry is now stale
    q.arm(("deadline", "j1"), 3.5)
    fired = []
    while (due := q.pop(10.0)) is not None:
        fired.append(due)
    assert fired == [(("offer", "j1"), 1), (("deadline", "j1"), 0), (("offer", "j1"), 2)]


def test_an_entry_armed_while_handling_runs_in_the_same_pass() -> None:
    """pop one at a time sees an entry armed, already due, by the handler of another."""
    q: TimerQueue[str] = TimerQueue()
    q.arm("first", 1.0)
    seen = []
    while (due := q.pop(1.0)) is not None:
        seen.append(due[0])
        if due[0] == "first":
            q.arm("follow-up", 1.0)
    assert seen == ["first", "follow-up"]


def test_keyed_and_tokened_entries_share_one_time_order() -> None:
    """Both kinds interleave by deadline; a stale keyed entry does not hide a tokened one."""
    q: TimerQueue[str] = TimerQueue()
    q.set("k", 1.0)
    q.arm("t", 2.0, 5)
    q.set("k", 3.0)
    assert q.next_deadline() == 2.0
    assert q.pop(5.0) == ("t", 5)
    assert q.pop(5.0) == ("k", 0)
    assert q.pop(5.0) is None
