"""Pure parts of the worker SDK: admission, status, backoff, URL, options."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from livekit.protocol import agent

from trunkline.worker import AcceptArguments, JobRequest, WorkerOptions
from trunkline.worker._conn import agent_url
from trunkline.worker._job import parse_metadata
from trunkline.worker._options import load_fnc_takes_worker
from trunkline.worker._policy import (
    Availability,
    Backoff,
    Refusal,
    compute_status,
    decide_availability,
    slot_load,
)


async def _entry(ctx: object) -> None:
    return None


def test_available_when_slot_free_and_load_low() -> None:
    """An offer goes to the application when a slot is free and load is below threshold."""
    got = decide_availability(
        draining=False, used_slots=1, max_jobs=2, load=0.5, load_threshold=1.0
    )
    assert got is None


def test_refused_at_capacity_counting_reserved() -> None:
    """used_slots (running + reserved) equal to max_jobs refuses the next offer."""
    got = decide_availability(
        draining=False, used_slots=4, max_jobs=4, load=0.0, load_threshold=1.0
    )
    assert got is Refusal.AT_CAPACITY


def test_refused_when_load_at_threshold() -> None:
    """Load equal to the threshold refuses (>=, as LiveKit's server compares)."""
    got = decide_availability(
        draining=False, used_slots=0, max_jobs=4, load=0.7, load_threshold=0.7
    )
    assert got is Refusal.OVERLOADED


def test_draining_wins_over_other_reasons() -> None:
    """A draining worker names draining as the reason even when also full."""
    got = decide_availability(draining=True, used_slots=9, max_jobs=4, load=5.0, load_threshold=1)
    assert got is Refusal.DRAINING


@given(
    draining=st.booleans(),
    used=st.integers(0, 20),
    cap=st.integers(1, 20),
    load=st.floats(0, 2),
    threshold=st.floats(0.01, 2),
)
def test_admission_never_exceeds_cap(
    draining: bool, used: int, cap: int, load: float, threshold: float
) -> None:
    """An offer is admitted iff not draining, used+1 <= cap and load < threshold."""
    got = decide_availability(
        draining=draining, used_slots=used, max_jobs=cap, load=load, load_threshold=threshold
    )
    assert (got is None) == (not draining and used + 1 <= cap and load < threshold)


def test_status_full_when_out_of_slots() -> None:
    """Status is FULL once reserved + running slots reach max_jobs; job_count is running."""
    report = compute_status(
        draining=False, used_slots=2, running_jobs=1, max_jobs=2, load=0.2, load_threshold=1.0
    )
    assert report.availability is Availability.FULL
    assert report.job_count == 1
    assert report.load == 0.2
    assert not report.draining


def test_status_available_with_free_slot() -> None:
    """Status is AVAILABLE with a free slot and load below threshold."""
    report = compute_status(
        draining=False, used_slots=1, running_jobs=1, max_jobs=2, load=0.5, load_threshold=1.0
    )
    assert report.availability is Availability.AVAILABLE


def test_status_full_when_overloaded() -> None:
    """Status is FULL when load reaches the threshold even with free slots."""
    report = compute_status(
        draining=False, used_slots=0, running_jobs=0, max_jobs=4, load=0.9, load_threshold=0.8
    )
    assert report.availability is Availability.FULL


def test_status_while_draining_is_full_with_zero_load() -> None:
    """A draining worker reports FULL, load 0, draining, and its running job count."""
    report = compute_status(
        draining=True, used_slots=0, running_jobs=3, max_jobs=4, load=0.1, load_threshold=1.0
    )
    assert (report.availability, report.load, report.job_count, report.draining) == (
        Availability.FULL,
        0.0,
        3,
        True,
    )


def test_slot_load_is_fraction_of_cap() -> None:
    """Default load is used/max_jobs, clamped to 1."""
    assert slot_load(0, 4) == 0.0
    assert slot_load(2, 4) == 0.5
    assert slot_load(5, 4) == 1.0


def test_backoff_schedule_doubles_to_cap() -> None:
    """With jitter factor 1 the delays are base, 2*base, ... capped."""
    b = Backoff(base=0.5, cap=4.0, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_never_below_half() -> None:
    """With the smallest jitter draw a delay is half its nominal value, never less."""
    b = Backoff(base=0.5, cap=4.0, rand=lambda: 0.0)
    assert [b.next_delay() for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]


@given(st.lists(st.floats(0, 0.999999), min_size=1, max_size=60))
def test_backoff_bounds(draws: list[float]) -> None:
    """Every delay lies in [nominal/2, nominal] and never exceeds the cap."""
    it = iter(draws)
    b = Backoff(base=0.5, cap=10.0, rand=lambda: next(it))
    for attempt in range(len(draws)):
        d = b.next_delay()
        nominal = min(10.0, 0.5 * 2**attempt)
        assert nominal / 2 <= d <= nominal <= 10.0


def test_backoff_reset_starts_over() -> None:
    """reset() makes the next delay the shortest again."""
    b = Backoff(base=1.0, cap=8.0, rand=lambda: 1.0)
    b.next_delay()
    b.next_delay()
    b.reset()
    assert b.next_delay() == 1.0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:7880", "ws://h:7880/agent?max_jobs=4"),
        ("https://h", "wss://h/agent?max_jobs=4"),
        ("ws://h/", "ws://h/agent?max_jobs=4"),
        ("wss://h/lk/", "wss://h/lk/agent?max_jobs=4"),
        ("ws://h?region=eu&max_jobs=9", "ws://h/agent?region=eu&max_jobs=4"),
    ],
)
def test_agent_url_declares_max_jobs(url: str, expected: str) -> None:
    """The /agent URL keeps host, path prefix and query, uses a ws scheme and sets max_jobs."""
    assert agent_url(url, 4) == expected


def test_agent_url_rejects_other_schemes() -> None:
    """A URL that is not http(s)/ws(s) is refused with the URL in the message."""
    with pytest.raises(ValueError, match="ftp://h"):
        agent_url("ftp://h", 1)


def test_options_default_from_livekit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """ws_url/api_key/api_secret default to LIVEKIT_URL/_API_KEY/_API_SECRET."""
    monkeypatch.setenv("LIVEKIT_URL", "ws://x")
    monkeypatch.setenv("LIVEKIT_API_KEY", "k")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s")
    opts = WorkerOptions(entrypoint_fnc=_entry)
    assert (opts.ws_url, opts.api_key, opts.api_secret) == ("ws://x", "k", "s")
    opts.validate_connection()


def test_options_missing_connection_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing credentials raise an error naming the option and its env variable."""
    monkeypatch.delenv("LIVEKIT_API_SECRET", raising=False)
    opts = WorkerOptions(entrypoint_fnc=_entry, ws_url="ws://x", api_key="k")
    with pytest.raises(ValueError, match=r"api_secret \(or \$LIVEKIT_API_SECRET\)"):
        opts.validate_connection()


@pytest.mark.parametrize(
    "bad", [{"max_jobs": 0}, {"num_idle_processes": -1}, {"load_threshold": 0}]
)
def test_options_reject_invalid_values(bad: dict[str, float]) -> None:
    """Invalid capacity settings fail at construction with the field name."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        WorkerOptions(entrypoint_fnc=_entry, **bad)  # type: ignore[arg-type]


def test_load_fnc_signature_detection() -> None:
    """load_fnc may take the worker or nothing; the worker tells which by its signature."""
    assert load_fnc_takes_worker(lambda w: 0.0)
    assert not load_fnc_takes_worker(lambda: 0.0)


def test_metadata_parsed_as_json_object() -> None:
    """Metadata is its JSON object, or {} for empty, non-JSON or non-object text."""
    assert parse_metadata('{"hold_s": 2}') == {"hold_s": 2}
    assert parse_metadata("") == {}
    assert parse_metadata("not json") == {}
    assert parse_metadata("[1]") == {}


async def test_job_request_answers_once_with_livekit_defaults() -> None:
    """accept() defaults identity to agent-<id>; a second answer raises."""
    seen: list[object] = []

    async def on_accept(args: AcceptArguments) -> None:
        seen.append(args)

    async def on_reject(terminate: bool) -> None:
        seen.append(terminate)

    req = JobRequest(agent.Job(id="J1"), on_accept=on_accept, on_reject=on_reject)
    await req.accept(name="Ann", attributes={"a": "b"})
    assert seen == [AcceptArguments(identity="agent-J1", name="Ann", attributes={"a": "b"})]
    with pytest.raises(RuntimeError, match="already answered"):
        await req.reject()


async def test_job_request_reject_terminates_by_default() -> None:
    """reject() without arguments sends terminate=True, as LiveKit's does."""
    seen: list[bool] = []

    async def on_accept(args: AcceptArguments) -> None:
        raise AssertionError

    async def on_reject(terminate: bool) -> None:
        seen.append(terminate)

    await JobRequest(agent.Job(id="J"), on_accept=on_accept, on_reject=on_reject).reject()
    assert seen == [True]
