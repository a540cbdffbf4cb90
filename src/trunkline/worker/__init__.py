"""trunkline's worker SDK: run voice agent jobs on a trunkline (or LiveKit) server.

It speaks the LiveKit Agents worker protocol and has a LiveKit-shaped API::

    from trunkline.worker import JobContext, WorkerOptions, run_app

    async def entrypoint(ctx: JobContext) -> None:
        ...  # the call
        ctx.shutdown()

    if __name__ == "__main__":
        run_app(WorkerOptions(entrypoint_fnc=entrypoint, max_jobs=4, agent_name="support"))

Capacity is declared on the wire: the worker connects to `<url>/agent?max_jobs=N`
and a trunkline server never offers it more than N concurrent jobs; the SDK
enforces the same cap locally. See docs/worker.md.
"""

from typing import TYPE_CHECKING, Any

from ._job import (
    AcceptArguments,
    AssignmentTimeoutError,
    JobContext,
    JobProcess,
    JobRequest,
)
from ._options import WorkerOptions
from ._pool import ProcessInitError
from ._run import run_app

if TYPE_CHECKING:
    from ._worker import Worker


def __getattr__(name: str) -> Any:
    # `Worker` pulls in aiohttp (~0.2 s). Job processes import the agent module,
    # which imports this package; they never need the connection side.
    if name == "Worker":
        from ._worker import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AcceptArguments",
    "AssignmentTimeoutError",
    "JobContext",
    "JobProcess",
    "JobRequest",
    "ProcessInitError",
    "Worker",
    "WorkerOptions",
    "run_app",
]
