"""The 201's JSON built from the live job equals the record-based view."""

from __future__ import annotations

from trunkline.core import Job, JobState, TraceEvent
from trunkline.server.views import job_json, live_job_json
from trunkline.stores import JobRecord

OFFSET = 1_764_547_200.123


def _jobs() -> list[Job]:
    queued = Job("AJ_1", "support", "room-1", "", 10.0, 5.0, "AD_1")
    offered = Job("AJ_2", "support", "room-2", '{"x": 1}', 10.0, 5.0, "AD_2", {"b": "2"})
    offered.state = JobState.OFFERED
    offered.worker_id = "AW_1"
    offered.trace.append(TraceEvent(10.000_17, "offered", "AW_1", None))
    ended = Job("AJ_3", "sales", "room-3", "m", 20.0, 2.5, "AD_3")
    ended.state = JobState.SUCCEEDED
    ended.reason = "job finished"
    ended.worker_id = "AW_2"
    ended.placed_at, ended.running_at, ended.ended_at = 20.001, 20.002_5, 21.75
    ended.queue_wait_s = 0.000_123_456_7
    ended.trace += [
        TraceEvent(20.001, "offered", "AW_2", None),
        TraceEvent(20.0015, "version", "AW_2", "v2"),
        TraceEvent(21.75, "succeeded", "AW_2", "job finished"),
    ]
    return [queued, offered, ended]


def test_live_job_json_is_the_record_view() -> None:
    """For queued, offered and ended jobs: same keys, order and values as
    job_json of the job's record (the two cannot drift apart)."""
    for job in _jobs():
        want = job_json(JobRecord.from_job(job, OFFSET))
        got = live_job_json(job, OFFSET)
        assert list(got) == list(want)
        assert got == want
