"""The local provider: replicas are processes on the server's machine.

Theory of operation
-------------------
Each replica is `asyncio.create_subprocess_exec(command)` in a session of its
own (so a terminal's Ctrl-C reaches the server, which then stops its replicas
in order, and so the whole process group can be cleaned up), with stdin closed
and stdout+stderr appended to `<run_dir>/<replica id>.log`. On Linux each child
also gets PR_SET_PDEATHSIG=SIGTERM unless `exit_with_server=False`: if the
server dies without stopping it, the replica drains and exits instead of
reconnecting forever.

While a replica lives, `<run_dir>/<replica id>.json` (mode 0600: it holds the
registration token) records its pid, its start time from `/proc/<pid>/stat`
and the boot id, which together name one process even after its pid is
reused, plus its pool, token and log path. The record goes when the replica
is gone. `list_existing` reads the records a previous server run left and
returns the replicas whose process is still the same one; the others ended
unwatched, and their records are removed.

Stopping sends SIGTERM to the replica's main process (a trunkline or
livekit-agents worker drains: no new jobs, running ones finish) and arms a
SIGKILL for the whole process group after the grace period. Our own children
are watched with `Process.wait()`; an adopted process is not our child, so it
is watched through a pidfd (`os.pidfd_open` + `loop.add_reader`; polling
`/proc` where pidfds are missing) and its exit status cannot be read: it is
reported as None, "exit status unknown". When the main process is gone,
whatever is left in its group (orphaned job processes) is SIGKILLed and the
exit callback runs, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trunkline.common.exits import describe_exit
from trunkline.providers.protocol import (
    Description,
    ExitCallback,
    Launch,
    ProviderError,
    ReplicaHandle,
    check_adoptable,
)

log = logging.getLogger("trunkline.providers")

_PR_SET_PDEATHSIG = 1
# After SIGKILL, how long to wait for the kernel to confirm a process is gone.
_CONFIRM_S = 5.0
_RECORD_VERSION = 1


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


def _start_ticks(pid: int) -> int | None:
    """The start time (clock ticks after boot) of live process `pid`; None if
    there is none, or only its zombie, or no `/proc` to ask."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may itself hold spaces
    # or parentheses: count the fields after its closing one.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        state, ticks = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None
    return None if state in (b"Z", b"X") else ticks


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclasses.dataclass(eq=False)
class LocalReplica:
    """A replica process: our child (`proc` set) or one found by `list_existing`."""

    replica_id: str
    pool: str
    token: str
    pid: int
    start_ticks: int | None  # None: could not be read, so it cannot be adopted later
    log_path: str
    proc: asyncio.subprocess.Process | None = None
    version: str = ""
    done: bool = False
    returncode: int | None = None
    # Provider bookkeeping.
    _on_exit: ExitCallback | None = dataclasses.field(default=None, repr=False)
    _watcher: asyncio.Task[None] | None = dataclasses.field(default=None, repr=False)
    _pidfd: int | None = dataclasses.field(default=None, repr=False)
    _term_sent: bool = dataclasses.field(default=False, repr=False)
    _kill_at: float | None = dataclasses.field(default=None, repr=False)
    _kill_timer: asyncio.TimerHandle | None = dataclasses.field(default=None, repr=False)
    _detached: bool = dataclasses.field(default=False, repr=False)
    _gone: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)

    @property
    def location(self) -> str:
        return f"pid {self.pid}"

    def describe(self) -> Description:
        return {"kind": "process", "pid": self.pid, "log": self.log_path, "version": self.version}


class LocalProvider:
    """Replicas as local processes; see the module docstring.

    `run_dir` holds the replicas' logs and records; a restarted server given the
    same `run_dir` finds the replicas still running. `poll_interval_s` is how
    often an adopted process is checked where pidfds are not available.
    """

    name = "local"

    def __init__(
        self,
        run_dir: str | Path,
        *,
        exit_with_server: bool = True,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.poll_interval_s = poll_interval_s
        self._preexec = _pdeathsig_hook() if exit_with_server else None
        self._watched: dict[str, LocalReplica] = {}
        self._detached: list[LocalReplica] = []
        self._spawning: set[asyncio.Future[None]] = set()
        self._closed = False

    @property
    def replicas(self) -> dict[str, LocalReplica]:
        """The watched replicas by id (a copy)."""
        return dict(self._watched)

    # ------------------------------------------------------------------ start

    async def start(self, launch: Launch, on_exit: ExitCallback) -> LocalReplica:
        """Spawn the command; raises `ProviderError` (e.g. no such executable)."""
        rid = launch.replica_id
        if self._closed:
            raise ProviderError(f"cannot start replica {rid!r}: the local provider is closed")
        if not rid or "/" in rid or "\0" in rid or rid.startswith("."):
            raise ProviderError(f"replica id {rid!r} cannot name a file in the run dir")
        if not launch.command:
            raise ProviderError(f"cannot start replica {rid!r}: its command is empty")
        live = self._watched.get(rid) or self._load_live(rid)
        if live is not None:
            raise ProviderError(
                f"replica {rid!r} is still running ({live.location}); "
                "adopt it (list_existing) or use another id"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / f"{rid}.log"
        env = dict(os.environ)
        env.update(launch.env)
        spawned: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawning.add(spawned)
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
        finally:
            self._spawning.discard(spawned)
            spawned.set_result(None)
        # A pid reused between the exec and this read would be misrecorded; the
        # window is microseconds, and the record only matters for adoption.
        h = LocalReplica(
            rid,
            launch.pool,
            launch.token,
            proc.pid,
            _start_ticks(proc.pid),
            str(log_path),
            proc,
            version=launch.version,
        )
        h._on_exit = on_exit
        self._watched[rid] = h
        if h.start_ticks is not None:
            self._write_record(h)
        h._watcher = asyncio.create_task(self._wait_child(h))
        log.info(
            "replica process started",
            extra={"replica": rid, "pid": proc.pid, "log": str(log_path)},
        )
        return h

    async def _wait_child(self, h: LocalReplica) -> None:
        assert h.proc is not None
        code = await h.proc.wait()
        self._ended(h, code)  # a no-op once detached: the child is only reaped, as init would

    # ------------------------------------------------------------------- stop

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """SIGTERM now, SIGKILL to the process group after `grace_s`."""
        h = self._own(handle)
        if h.done:
            return
        loop = asyncio.get_running_loop()
        kill_at = loop.time() + max(grace_s, 0.0)
        if h._kill_at is not None and h._kill_at <= kill_at:
            return  # already asked, with a forced end no later than this one
        h._kill_at = kill_at
        if h._kill_timer is not None:
            h._kill_timer.cancel()
            h._kill_timer = None
        if grace_s <= 0:
            self._kill_group(h)
            return
        if not h._term_sent:
            h._term_sent = True
            self._signal(h, signal.SIGTERM)
        h._kill_timer = loop.call_at(kill_at, self._kill_group, h)

    def _signal(self, h: LocalReplica, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if h.proc is not None:
                h.proc.send_signal(sig)
            elif h._pidfd is not None:
                signal.pidfd_send_signal(h._pidfd, sig)
            elif self._same_process(h):
                os.kill(h.pid, sig)

    def _kill_group(self, h: LocalReplica) -> None:
        h._kill_timer = None
        if h.done:
            return
        if h.proc is None and h._pidfd is None and not self._same_process(h):
            return  # a listed replica that has gone; its pid may be someone else's
        _killpg(h.pid)

    # ------------------------------------------------------------- adoption

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        """Replicas recorded in the run dir whose process still runs."""
        if not self.run_dir.is_dir():
            return []
        found: list[ReplicaHandle] = []
        for path in sorted(self.run_dir.glob("*.json")):
            rid = path.stem
            if rid in self._watched:
                continue
            h = self._load_live(rid)
            if h is not None and (pool is None or h.pool == pool):
                found.append(h)
        return found

    def adopt(self, handle: ReplicaHandle, on_exit: ExitCallback) -> None:
        """Watch a listed replica through a pidfd (or by polling `/proc`)."""
        h = self._own(handle)
        watched = h.replica_id in self._watched or h._on_exit is not None or h.done
        check_adoptable(h.replica_id, closed=self._closed, watched=watched)
        h._on_exit = on_exit
        self._watched[h.replica_id] = h
        loop = asyncio.get_running_loop()
        try:
            fd: int | None = os.pidfd_open(h.pid)
        except ProcessLookupError:
            loop.call_soon(self._ended, h, None)
            return
        except (AttributeError, OSError):
            fd = None  # no pidfds here (old kernel, not Linux): poll /proc
        if fd is not None and not self._same_process(h):
            os.close(fd)  # the pid is already someone else's
            loop.call_soon(self._ended, h, None)
            return
        if fd is None:
            h._watcher = asyncio.create_task(self._poll(h))
        else:
            h._pidfd = fd
            loop.add_reader(fd, self._ended, h, None)
        log.info("replica process adopted", extra={"replica": h.replica_id, "pid": h.pid})

    async def _poll(self, h: LocalReplica) -> None:
        # No event exists to wait on here: polling is the fallback's point.
        while self._same_process(h):  # noqa: ASYNC110
            await asyncio.sleep(self.poll_interval_s)
        self._ended(h, None)

    # ---------------------------------------------------------------- the end

    def _ended(self, h: LocalReplica, code: int | None, detail: str | None = None) -> None:
        """The replica is gone: clean up and call its `on_exit`, exactly once."""
        if h.done or h._detached:
            return
        h.done = True
        h.returncode = code
        self._unwatch(h)
        _killpg(h.pid)  # job processes the replica left behind
        self._remove_record(h.replica_id)
        if self._watched.get(h.replica_id) is h:
            del self._watched[h.replica_id]
        h._gone.set()
        detail = detail or describe_exit(code)
        log.info("replica process exited", extra={"replica": h.replica_id, "how": detail})
        on_exit, h._on_exit = h._on_exit, None
        if on_exit is not None:
            try:
                on_exit(code, detail)
            except Exception:
                log.exception("replica exit callback failed", extra={"replica": h.replica_id})

    def _unwatch(self, h: LocalReplica) -> None:
        if h._kill_timer is not None:
            h._kill_timer.cancel()
            h._kill_timer = None
        if h._pidfd is not None:
            asyncio.get_running_loop().remove_reader(h._pidfd)
            os.close(h._pidfd)
            h._pidfd = None
        w = h._watcher
        if w is not None and h.proc is None and w is not asyncio.current_task():
            w.cancel()  # the /proc poll; a child's waiter is what reaps it, so it stays

    def detach(self) -> None:
        """Leave every replica running and unwatched, records in place."""
        self._closed = True
        for h in self._watched.values():
            h._detached = True
            h._on_exit = None
            self._unwatch(h)
            if h.proc is not None:
                self._detached.append(h)
        self._watched.clear()

    async def aclose(self, grace_s: float) -> None:
        """Stop every watched replica; wait for them (at most `grace_s`, then SIGKILL)."""
        self._closed = True
        while self._spawning or self._watched:
            if self._spawning:
                await asyncio.wait(set(self._spawning))
            live = list(self._watched.values())
            for h in live:
                await self.stop(h, grace_s)
            await _wait_gone(live, grace_s + _CONFIRM_S)
            for h in live:
                if not h.done:
                    _killpg(h.pid)
            await _wait_gone(live, _CONFIRM_S)
            for h in live:
                if not h.done:
                    log.warning("replica survived SIGKILL", extra={"replica": h.replica_id})
                    self._ended(h, None, "still running after SIGKILL; no longer watched")
        # Detached children that have ended: let asyncio finish reaping them, so
        # their transports close while the loop still runs. Live ones stay.
        reaping = [
            h._watcher
            for h in self._detached
            if h._watcher is not None
            and not h._watcher.done()
            and h.start_ticks is not None
            and _start_ticks(h.pid) != h.start_ticks
        ]
        if reaping:
            await asyncio.wait(reaping, timeout=_CONFIRM_S)

    # ---------------------------------------------------------------- records

    def _own(self, handle: ReplicaHandle) -> LocalReplica:
        if not isinstance(handle, LocalReplica):
            raise ProviderError(f"{handle!r} is not a local replica")
        return handle

    def _same_process(self, h: LocalReplica) -> bool:
        return h.start_ticks is not None and _start_ticks(h.pid) == h.start_ticks

    def _record_path(self, rid: str) -> Path:
        return self.run_dir / f"{rid}.json"

    def _write_record(self, h: LocalReplica) -> None:
        record = {
            "version": _RECORD_VERSION,
            "replica_id": h.replica_id,
            "pool": h.pool,
            "token": h.token,
            "pid": h.pid,
            "start_ticks": h.start_ticks,
            "boot_id": _boot_id(),
            "log": h.log_path,
            "pool_version": h.version,
        }
        path = self._record_path(h.replica_id)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)  # readers see a whole record or none
        except OSError as exc:
            log.warning(
                "replica record not written; a restarted server will not adopt it",
                extra={"replica": h.replica_id, "error": str(exc)},
            )

    def _remove_record(self, rid: str) -> None:
        with contextlib.suppress(OSError):
            self._record_path(rid).unlink(missing_ok=True)

    def _load_live(self, rid: str) -> LocalReplica | None:
        """The replica recorded under `rid` if its process still runs; a record
        of one that has ended is removed."""
        path = self._record_path(rid)
        try:
            raw: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable replica record", extra={"path": str(path), "error": str(exc)})
            return None
        h = _from_record(raw)
        if h is None or h.replica_id != rid:
            log.warning("unreadable replica record", extra={"path": str(path)})
            return None
        if raw["boot_id"] != _boot_id() or not self._same_process(h):
            self._remove_record(rid)
            log.info("replica ended while unwatched", extra={"replica": rid, "pid": h.pid})
            return None
        return h


def _from_record(raw: Any) -> LocalReplica | None:
    if not isinstance(raw, dict) or raw.get("version") != _RECORD_VERSION:
        return None
    strs = ("replica_id", "pool", "token", "boot_id", "log")
    ints = ("pid", "start_ticks")
    if not all(isinstance(raw.get(k), str) for k in strs):
        return None
    if not all(isinstance(raw.get(k), int) for k in ints):
        return None
    version = raw.get("pool_version", "")  # absent in records of older servers
    return LocalReplica(
        raw["replica_id"],
        raw["pool"],
        raw["token"],
        raw["pid"],
        raw["start_ticks"],
        raw["log"],
        version=version if isinstance(version, str) else "",
    )


async def _wait_gone(replicas: list[LocalReplica], within_s: float) -> None:
    waits = [asyncio.ensure_future(h._gone.wait()) for h in replicas if not h.done]
    if not waits:
        return
    try:
        await asyncio.wait(waits, timeout=within_s)
    finally:
        for w in waits:
            w.cancel()
