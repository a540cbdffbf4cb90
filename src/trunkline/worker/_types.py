"""Types the worker SDK's modules share: application callbacks and small seams.

A leaf of the package: it imports only `_job` (which imports nothing of the
package), so every other module can name these types without importing the
module that implements them. That is what keeps the package free of import
cycles: `_options` names the callbacks here rather than `_worker`, and the
admission side talks to the session through `Link` rather than `_session`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from livekit.protocol import agent

from ._job import JobContext, JobProcess, JobRequest

EntrypointFnc = Callable[[JobContext], Awaitable[None]]
RequestFnc = Callable[[JobRequest], Awaitable[None]]
PrewarmFnc = Callable[[JobProcess], Any]
# The one-argument form is called with the `Worker`. It is typed `Any` rather
# than `Worker` because naming the class would make the options import the
# worker, which imports the options; every function that type-checked against
# `Callable[[Worker], float]` still does.
LoadFnc = Callable[[Any], float] | Callable[[], float]

# `report(job_id, status, error)`: a job's JS_RUNNING or final status.
ReportFnc = Callable[[str, "agent.JobStatus", str], None]
# `spawn(coro)`: run background work under the worker's supervision (it is
# awaited on close and its failures are logged).
SpawnFnc = Callable[[Coroutine[Any, Any, None]], None]


class Link(Protocol):
    """What the admission side needs of the server session (see `_session.Session`).

    `connected` is true while a registered session is up; `session_no` counts
    registrations and names the current one; `send()` queues a message in
    order (worker status and offer answers are dropped if the session ends
    before they are written, job status updates wait for the next one).
    """

    @property
    def worker_id(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def session_no(self) -> int: ...

    def send(self, msg: agent.WorkerMessage) -> None: ...
