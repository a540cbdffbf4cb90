"""`WorkerOptions`: everything a worker replica needs, validated once.

Theory of operation: options are a frozen value built by the application (or
the `trunkline worker` command). Server address and credentials default to
LiveKit's environment variables (`LIVEKIT_URL`, `LIVEKIT_API_KEY`,
`LIVEKIT_API_SECRET`), which trunkline's local provider sets for each replica,
so the same agent module runs unchanged under trunkline or LiveKit.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Literal

from ._types import EntrypointFnc, LoadFnc, PrewarmFnc, RequestFnc

# LiveKit workers wait this long for the assignment after accepting an offer.
ASSIGNMENT_TIMEOUT_S = 7.5
# LiveKit workers report their status this often.
STATUS_INTERVAL_S = 2.5


def _env(name: str) -> str:
    return os.environ.get(name, "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How one worker replica connects, admits jobs and runs them.

    `entrypoint_fnc(ctx)` runs each job in its own process; the job ends when it
    returns, raises (the job is reported failed with the exception's message) or
    calls `ctx.shutdown()`. `entrypoint_fnc` and `prewarm_fnc` must be importable
    module-level functions: job processes are started with `forkserver` or
    `spawn` and find them by module and name (a script using `run_app` must
    guard it with `if __name__ == "__main__":`).

    `request_fnc(req)` decides each offer with `await req.accept()` or
    `await req.reject()`; it must answer within the server's availability
    timeout (3 s by default). Without it every offer that passes the capacity
    check is accepted.

    `max_jobs` is the hard number of concurrent jobs. It is declared to the
    server (query parameter `max_jobs` on the `/agent` URL), which never offers
    more, and enforced here too. `load_fnc` (default: fraction of slots in use)
    is sampled before each offer and every status report; offers are refused
    while it is at or above `load_threshold`. It runs on the event loop and must
    return quickly; it may take the `Worker` as its one argument.
    """

    entrypoint_fnc: EntrypointFnc
    request_fnc: RequestFnc | None = None
    prewarm_fnc: PrewarmFnc | None = None
    load_fnc: LoadFnc | None = None
    load_threshold: float = 1.0
    max_jobs: int = 4
    agent_name: str = ""
    ws_url: str = dataclasses.field(default_factory=lambda: _env("LIVEKIT_URL"))
    api_key: str = dataclasses.field(default_factory=lambda: _env("LIVEKIT_API_KEY"))
    api_secret: str = dataclasses.field(default_factory=lambda: _env("LIVEKIT_API_SECRET"))
    # Warm processes (each has run prewarm_fnc) kept ready for the next jobs.
    num_idle_processes: int = 2
    # Seconds a draining worker lets running jobs finish before shutting them down.
    drain_timeout: float = 1800.0
    # Seconds a job process gets to finish after a shutdown request before SIGKILL.
    shutdown_process_timeout: float = 10.0
    # Seconds a new process gets to run prewarm_fnc and report ready.
    initialize_process_timeout: float = 10.0
    multiprocessing_context: Literal["forkserver", "spawn"] = "forkserver"
    # Websocket ping interval; a missing pong within half of it drops the connection.
    heartbeat_interval: float = 10.0
    # Reconnect backoff: base and cap (seconds) of the jittered exponential schedule.
    reconnect_base: float = 0.5
    reconnect_cap: float = 10.0
    # Give up after this many consecutive failed connection attempts (None: never).
    max_retry: int | None = None
    assignment_timeout: float = ASSIGNMENT_TIMEOUT_S
    status_interval: float = STATUS_INTERVAL_S
    version: str = ""

    def __post_init__(self) -> None:
        if not callable(self.entrypoint_fnc):
            raise TypeError("entrypoint_fnc must be an async function taking a JobContext")
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {self.max_jobs}")
        if self.num_idle_processes < 0:
            raise ValueError(f"num_idle_processes must be >= 0, got {self.num_idle_processes}")
        if math.isnan(self.load_threshold) or self.load_threshold <= 0:
            raise ValueError(f"load_threshold must be > 0, got {self.load_threshold}")
        if self.multiprocessing_context not in ("forkserver", "spawn"):
            raise ValueError(
                "multiprocessing_context must be 'forkserver' or 'spawn', "
                f"got {self.multiprocessing_context!r}"
            )
        for name in ("drain_timeout", "shutdown_process_timeout", "initialize_process_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def validate_connection(self) -> None:
        """Raise `ValueError` naming the missing setting and how to provide it."""
        missing = [
            (field, env)
            for field, env in (
                ("ws_url", "LIVEKIT_URL"),
                ("api_key", "LIVEKIT_API_KEY"),
                ("api_secret", "LIVEKIT_API_SECRET"),
            )
            if not getattr(self, field)
        ]
        if missing:
            names = ", ".join(f"{field} (or ${env})" for field, env in missing)
            raise ValueError(f"worker cannot connect: missing {names}")


def load_fnc_takes_worker(fnc: LoadFnc) -> bool:
    """True when `fnc` expects the `Worker` as its one positional argument."""
    try:
        params = inspect.signature(fnc).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 1
