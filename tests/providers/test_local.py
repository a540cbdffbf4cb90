"""What only the local provider does: records in the run dir, pid-reuse
safety, the /proc fallback, orphan cleanup, and restarts across real server
processes (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from providers.backends import REPLICA_PY, ReadyListener
from providers.contract import Exits

from trunkline.providers import Launch
from trunkline.providers.local import LocalProvider, LocalReplica, _boot_id, _start_ticks

TIMEOUT_S = 30.0


@pytest.fixture
async def listener() -> AsyncIterator[ReadyListener]:
    async with ReadyListener() as ready:
        yield ready


def replica(
    ready: ReadyListener, rid: str, mode: str = "graceful", script: str = REPLICA_PY
) -> Launch:
    env = {"READY_PORT": str(ready.port), "TRUNKLINE_REPLICA_ID": rid}
    return Launch(rid, "support", (sys.executable, "-S", "-c", script, mode), env, f"tok-{rid}")


async def wait_pid_gone(pid: int) -> None:
    """Returns once process `pid` (not necessarily our child) has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        await asyncio.wait_for(gone.wait(), TIMEOUT_S)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_live_replica_has_a_private_record_removed_when_it_ends(
    tmp_path: Path, listener: ReadyListener
) -> None:
    """`<id>.json` (mode 0600) names pid, start time, pool, token and log while
    the replica lives, and is gone once its exit is reported."""
    p = LocalProvider(tmp_path)
    ex = Exits()
    h = await ex.start(p, replica(listener, "support-1"))
    await listener.ready("support-1")
    record = tmp_path / "support-1.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    data = json.loads(record.read_text())
    assert isinstance(h, LocalReplica)
    assert data["pid"] == h.pid
    assert data["start_ticks"] == _start_ticks(h.pid)
    assert (data["pool"], data["token"]) == ("support", "tok-support-1")
    assert data["log"] == str(tmp_path / "support-1.log") == h.describe()["log"]
    await p.stop(h, TIMEOUT_S)
    await ex.wait_for_exit("support-1", TIMEOUT_S)
    assert not record.exists()
    await p.aclose(1.0)


async def test_the_log_gets_stdout_and_stderr(tmp_path: Path) -> None:
    """A replica's stdout and stderr both land in `<run_dir>/<id>.log`."""
    p = LocalProvider(tmp_path)
    ex = Exits()
    script = "import sys; print('to-out', flush=True); print('to-err', file=sys.stderr)"
    la = Launch("support-1", "support", (sys.executable, "-S", "-c", script), {}, "tok")
    await ex.start(p, la)
    assert await ex.wait_for_exit("support-1", TIMEOUT_S) == (0, "exited with code 0")
    text = (tmp_path / "support-1.log").read_text()
    assert "to-out" in text
    assert "to-err" in text
    await p.aclose(1.0)


async def test_records_of_other_processes_are_not_listed(tmp_path: Path) -> None:
    """A record whose pid now runs another process (other start time or boot)
    is dropped; an unreadable one is skipped; the true one is listed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-c", "import signal; signal.pause()"
    )
    try:
        ticks = _start_ticks(proc.pid)
        assert ticks is not None

        def write(rid: str, **changes: object) -> Path:
            rec = {
                "version": 1,
                "replica_id": rid,
                "pool": "support",
                "token": "tok",
                "pid": proc.pid,
                "start_ticks": ticks,
                "boot_id": _boot_id(),
                "log": str(tmp_path / f"{rid}.log"),
                **changes,
            }
            path = tmp_path / f"{rid}.json"
            path.write_text(json.dumps(rec))
            return path

        write("support-true")
        reused = write("support-reused", start_ticks=ticks - 1)
        rebooted = write("support-rebooted", boot_id="another-boot")
        garbled = tmp_path / "support-garbled.json"
        garbled.write_text("{not json")
        listed = await LocalProvider(tmp_path).list_existing()
        assert [h.replica_id for h in listed] == ["support-true"]
        assert not reused.exists()
        assert not rebooted.exists()
        assert garbled.exists()  # not ours to judge: left for a person to look at
    finally:
        proc.kill()
        await proc.wait()


async def test_adoption_polls_proc_where_pidfds_are_missing(
    tmp_path: Path, listener: ReadyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `os.pidfd_open` an adopted replica is watched by polling /proc:
    still stopped, still reported once."""
    old = LocalProvider(tmp_path)
    await Exits().start(old, replica(listener, "support-1"))
    await listener.ready("support-1")
    old.detach()

    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    p = LocalProvider(tmp_path, poll_interval_s=0.02)
    [h] = await p.list_existing()
    ex = Exits()
    ex.adopt(p, h)
    await ex.stop(p, h, TIMEOUT_S)
    assert await ex.wait_for_exit("support-1", TIMEOUT_S) == (None, "exit status unknown")
    await p.aclose(1.0)
    await old.aclose(1.0)
    assert ex.count("support-1") == 1
    ex.assert_clean()


ORPHANING_PY = r"""
import os, signal, socket, subprocess, sys
child = subprocess.Popen([sys.executable, "-S", "-c", "import signal; signal.pause()"])
with open(os.environ["ORPHAN_PID_FILE"], "w") as f:
    f.write(str(child.pid))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # leaves its child behind
with socket.create_connection(("127.0.0.1", int(os.environ["READY_PORT"]))) as s:
    s.sendall(os.environ["TRUNKLINE_REPLICA_ID"].encode() + b"\n")
while True:
    signal.pause()
"""


async def test_processes_a_replica_leaves_behind_are_killed(
    tmp_path: Path, listener: ReadyListener
) -> None:
    """When a replica's main process ends, what is left of its process group
    (orphaned job processes) is killed."""
    p = LocalProvider(tmp_path / "run")
    ex = Exits()
    la = replica(listener, "support-1", script=ORPHANING_PY)
    pid_file = tmp_path / "orphan.pid"
    la = Launch(
        la.replica_id, la.pool, la.command, {**la.env, "ORPHAN_PID_FILE": str(pid_file)}, la.token
    )
    h = await ex.start(p, la)
    await listener.ready("support-1")
    orphan = int(pid_file.read_text())
    assert _start_ticks(orphan) is not None
    await p.stop(h, TIMEOUT_S)
    assert await ex.wait_for_exit("support-1", TIMEOUT_S) == (0, "exited with code 0")
    await wait_pid_gone(orphan)
    await p.aclose(1.0)


SERVER_PY = r"""
import asyncio, os, sys
from trunkline.providers import Launch
from trunkline.providers.local import LocalProvider

async def main():
    run_dir, exit_with_server, ready_port, script = sys.argv[1:5]
    p = LocalProvider(run_dir, exit_with_server=exit_with_server == "1")
    env = {"READY_PORT": ready_port, "TRUNKLINE_REPLICA_ID": "support-1"}
    cmd = (sys.executable, "-S", "-c", script, "graceful")
    h = await p.start(Launch("support-1", "support", cmd, env, "tok-1"), lambda c, d: None)
    print(h.pid, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    os._exit(0)  # the server dies: no aclose, no detach

asyncio.run(main())
"""


async def run_dying_server(tmp_path: Path, listener: ReadyListener, exit_with_server: bool) -> int:
    """A real server process starts support-1, then dies; returns the replica's pid."""
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER_PY,
        str(tmp_path),
        "1" if exit_with_server else "0",
        str(listener.port),
        REPLICA_PY,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    pid = int(await asyncio.wait_for(server.stdout.readline(), TIMEOUT_S))
    await listener.ready("support-1")
    server.stdin.write(b"\n")
    await server.stdin.drain()
    assert await asyncio.wait_for(server.wait(), TIMEOUT_S) == 0
    return pid


async def test_a_restarted_server_adopts_the_replica_of_a_dead_one(
    tmp_path: Path, listener: ReadyListener
) -> None:
    """With `exit_with_server=False` a replica outlives its server process; the
    next server lists it with its token, adopts it, stops it, hears it once."""
    pid = await run_dying_server(tmp_path, listener, exit_with_server=False)
    p = LocalProvider(tmp_path)
    [h] = await p.list_existing("support")
    assert (h.replica_id, h.token, h.location) == ("support-1", "tok-1", f"pid {pid}")
    ex = Exits()
    ex.adopt(p, h)
    await ex.stop(p, h, TIMEOUT_S)
    assert await ex.wait_for_exit("support-1", TIMEOUT_S) == (None, "exit status unknown")
    await wait_pid_gone(pid)
    assert not (tmp_path / "support-1.json").exists()
    await p.aclose(1.0)
    ex.assert_clean()


async def test_a_replica_drains_when_its_server_dies(
    tmp_path: Path, listener: ReadyListener
) -> None:
    """By default (PR_SET_PDEATHSIG) a replica gets SIGTERM when its server
    dies, and a later server does not list it once it has gone."""
    pid = await run_dying_server(tmp_path, listener, exit_with_server=True)
    await wait_pid_gone(pid)
    assert await LocalProvider(tmp_path).list_existing() == []
    assert not (tmp_path / "support-1.json").exists()
