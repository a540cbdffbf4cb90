"""How a process ended, in words: one wording for replicas and job processes."""

from __future__ import annotations

import signal


def describe_exit(code: int | None) -> str:
    """ "exited with code N" / "killed by SIGKILL" / "exit status unknown"
    (`code` as `asyncio` and `subprocess` report it: negative for a signal)."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
