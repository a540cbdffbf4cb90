"""`run_app`: run one worker replica in this process until it is told to stop.

Theory of operation: SIGTERM (what an autoscaler or Kubernetes sends) and a
first SIGINT start a drain: no new jobs, running ones finish (up to
`drain_timeout`), their final status is sent, then the worker closes and the
process exits 0. A second SIGINT skips the wait: running jobs are shut down at
once and the worker closes. Job processes ignore both signals; the worker
tells them when to stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from trunkline.common.logs import setup_logging

from ._options import WorkerOptions

logger = logging.getLogger("trunkline.worker")

_LEVELS = ("debug", "info", "warning", "error")


def run_app(opts: WorkerOptions, *, log_level: str = "info", log_format: str = "text") -> int:
    """Run a worker until drained or closed; returns the process exit code.

    Logs go to stderr in trunkline's format (`log_format` "text" or "json"),
    from job processes too. Exit codes: 0 drained or closed on request; 1 the
    server stayed unreachable for `max_retry` attempts; 2 the options are
    incomplete (e.g. no URL).
    """
    if log_level.lower() not in _LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(_LEVELS)}, got {log_level!r}")
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    setup_logging(log_level, log_format)
    return asyncio.run(_main(opts, log_level.lower(), log_format))


async def _main(opts: WorkerOptions, log_level: str, log_format: str) -> int:
    # Imported here: job processes import this module (through the agent's
    # `from trunkline.worker import run_app`) but never run a worker.
    from ._worker import Worker

    worker = Worker(opts, log_level=log_level, log_format=log_format)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    async def drain_then_close() -> None:
        await worker.drain()
        await worker.aclose()

    def on_signal(sig: signal.Signals) -> None:
        if not worker.draining:
            logger.info("signal received, draining", extra={"signal": sig.name})
            task = loop.create_task(drain_then_close())
        else:
            logger.info("signal received again, closing now", extra={"signal": sig.name})
            task = loop.create_task(worker.aclose())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await worker.run()
    except ValueError as exc:
        logger.error("worker misconfigured", extra={"error": str(exc)})
        return 2
    except ConnectionError as exc:
        logger.error("worker gave up connecting", extra={"error": str(exc)})
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
