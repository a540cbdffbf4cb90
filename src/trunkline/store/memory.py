"""In-memory job history: the newest ended jobs, bounded.

Live jobs belong to the scheduler; when one ends, the server files it here so
`GET /v1/jobs/{id}` and traces keep working afterwards. The oldest entries are
evicted past `capacity`, so memory stays bounded under any load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from trunkline.core.entities import Job


class JobHistory:
    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        if self.capacity <= 0:
            return
        self._jobs[job.id] = job
        if len(self._jobs) > self.capacity:
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def newest(self) -> Iterator[Job]:
        """Ended jobs, newest first."""
        return reversed(self._jobs.values())

    def __len__(self) -> int:
        return len(self._jobs)
