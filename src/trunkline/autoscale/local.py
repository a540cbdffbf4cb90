"""The local provider: replicas are child processes of the server.

Theory of operation: each replica is `asyncio.create_subprocess_exec(command)`
in a session of its own (so a terminal's Ctrl-C reaches the server, which then
stops its replicas in order, and so the whole process group can be cleaned up),
with stdin closed and stdout+stderr appended to `<run_dir>/<replica id>.log`.
On Linux each child also gets PR_SET_PDEATHSIG=SIGTERM: if the server dies
without stopping it, the replica drains and exits instead of reconnecting
forever.

Stopping sends SIGTERM to the replica's main process (a trunkline or
livekit-agents worker drains: no new jobs, running ones finish) and arms a
SIGKILL for the whole process group after the grace period. One task per
replica waits for the main process to exit; it then SIGKILLs whatever is left
in the group (orphaned job processes) and calls the exit callback once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from trunkline.autoscale.provider import ExitCallback, Launch, ProviderError

log = logging.getLogger("trunkline.autoscale")

_PR_SET_PDEATHSIG = 1


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec function setting PR_SET_PDEATHSIG (Linux only). libc is loaded
    here, in the parent, so the child runs one foreign call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def describe_exit(code: int | None) -> str:
    """ "exited with code N" / "killed by SIGKILL" / "exit status unknown"."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclasses.dataclass(eq=False)
class LocalReplica:
    """A running (or finished) child process."""

    replica_id: str
    proc: asyncio.subprocess.Process
    log_path: str
    waiter: asyncio.Task[None] | None = None
    kill_timer: asyncio.TimerHandle | None = None
    returncode: int | None = None
    done: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid


class LocalProvider:
    """Replicas as child processes; see the module docstring."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.replicas: dict[str, LocalReplica] = {}
        self._preexec = _pdeathsig_hook()

    async def start(self, launch: Launch, on_exit: ExitCallback) -> LocalReplica:
        """Spawn the command; raises `ProviderError` (e.g. no such executable)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / f"{launch.replica_id}.log"
        env = dict(os.environ)
        env.update(launch.env)
        try:
            with log_path.open("ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *launch.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=self._preexec,
                )
        except OSError as exc:
            raise ProviderError(f"cannot run {launch.command[0]!r}: {exc.strerror or exc}") from exc
        handle = LocalReplica(launch.replica_id, proc, str(log_path))
        self.replicas[launch.replica_id] = handle
        handle.waiter = asyncio.create_task(self._wait(handle, on_exit))
        log.info(
            "replica process started",
            extra={"replica": launch.replica_id, "pid": proc.pid, "log": str(log_path)},
        )
        return handle

    async def _wait(self, h: LocalReplica, on_exit: ExitCallback) -> None:
        code = await h.proc.wait()
        h.returncode = code
        h.done = True
        if h.kill_timer is not None:
            h.kill_timer.cancel()
        _killpg(h.proc.pid)  # job processes the replica left behind
        self.replicas.pop(h.replica_id, None)
        detail = describe_exit(code)
        log.info("replica process exited", extra={"replica": h.replica_id, "how": detail})
        on_exit(code, detail)

    def stop(self, handle: object, grace_s: float) -> None:
        """SIGTERM now, SIGKILL to the process group after `grace_s`."""
        assert isinstance(handle, LocalReplica)
        if handle.done or handle.kill_timer is not None:
            return
        loop = asyncio.get_running_loop()
        if grace_s <= 0:
            _killpg(handle.proc.pid)
            return
        with contextlib.suppress(ProcessLookupError):
            handle.proc.send_signal(signal.SIGTERM)
        handle.kill_timer = loop.call_later(grace_s, _killpg, handle.proc.pid)

    async def aclose(self, grace_s: float) -> None:
        """Stop every replica; wait for them (at most `grace_s`, then SIGKILL)."""
        live = list(self.replicas.values())
        for h in live:
            self.stop(h, grace_s)
        waiters = [h.waiter for h in live if h.waiter is not None]
        if waiters:
            await asyncio.wait(waiters, timeout=grace_s + 5.0)
        for h in live:
            if not h.done:
                _killpg(h.proc.pid)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
