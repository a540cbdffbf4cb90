"""The contract's backends: how to run `contract.py` on each provider.

A new provider adds a function here returning its `Backend`, and one entry in
`test_contract.py`'s parameter list.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from providers.contract import Backend, Behaviour

from trunkline.providers import Provider, ReplicaHandle
from trunkline.providers.fake import FORCED_EXIT_CODE, FakeBackend, FakeProvider
from trunkline.providers.local import LocalProvider

# A replica stand-in: says "ready" over TCP once its SIGTERM handling is set
# (a stop before that would kill it with the default action, not test the
# provider), then waits for signals.
REPLICA_PY = r"""
import os, signal, socket, sys
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "graceful":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with socket.create_connection(("127.0.0.1", int(os.environ["READY_PORT"]))) as s:
    s.sendall(os.environ["TRUNKLINE_REPLICA_ID"].encode() + b"\n")
while True:
    signal.pause()
"""


class ReadyListener:
    """Replicas connect here when ready; `ready(rid)` waits for that one."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    def _event(self, rid: str) -> asyncio.Event:
        return self._events.setdefault(rid, asyncio.Event())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self._event(line.decode().strip()).set()
        writer.close()

    async def __aenter__(self) -> ReadyListener:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def ready(self, rid: str, timeout_s: float = 30.0) -> None:
        try:
            await asyncio.wait_for(self._event(rid).wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"replica {rid} never said it was ready") from None


async def _kill_local(h: ReplicaHandle) -> None:
    """SIGKILL a replica we started (its handle from `start`) and wait until reaped."""
    from trunkline.providers.local import LocalReplica

    assert isinstance(h, LocalReplica)
    assert h.proc is not None
    os.kill(h.pid, signal.SIGKILL)
    await h.proc.wait()


@asynccontextmanager
async def local_backend(run_dir: Path) -> AsyncIterator[Backend]:
    """The local provider over `run_dir`, with small Python replicas."""
    async with ReadyListener() as listener:

        def command(behaviour: Behaviour) -> tuple[str, ...]:
            return (sys.executable, "-S", "-c", REPLICA_PY, behaviour)

        yield Backend(
            name="local",
            new_provider=lambda: LocalProvider(run_dir),
            command=command,
            unstartable=lambda la: dataclasses.replace(
                la, command=(str(run_dir / "no-such-executable"),)
            ),
            ready=listener.ready,
            kill_unwatched=_kill_local,
            forced_exit_codes=(-signal.SIGKILL,),
            env={"READY_PORT": str(listener.port)},
        )


def fake_backend(
    make: Callable[[FakeBackend], Provider] = FakeProvider,
) -> Backend:
    """The fake provider (or a subclass: `make`) over one shared `FakeBackend`."""
    world = FakeBackend()
    world.missing.add("no-such-executable")
    world.stubborn.add("fake-stubborn")
    world.exit_codes["fake-exit3"] = 3

    async def ready(rid: str) -> None:
        return None

    async def kill(h: ReplicaHandle) -> None:
        world.exit(h.replica_id, FORCED_EXIT_CODE)

    return Backend(
        name="fake",
        new_provider=lambda: make(world),
        command=lambda behaviour: (f"fake-{behaviour}",),
        unstartable=lambda la: dataclasses.replace(la, command=("no-such-executable",)),
        ready=ready,
        kill_unwatched=kill,
        forced_exit_codes=(FORCED_EXIT_CODE,),
        short_grace_s=0.2,
        timeout_s=2.0,
    )


@asynccontextmanager
async def kubernetes_backend(tmp: Path) -> AsyncIterator[Backend]:
    """The Kubernetes provider against the fake API server, whose kubelet runs
    the same small Python replicas as local processes."""
    from providers.k8s.harness import fake_cluster, phase

    async with ReadyListener() as listener, fake_cluster(tmp) as cluster:
        template = cluster.template()

        async def kill(h: ReplicaHandle) -> None:
            from trunkline.providers.kubernetes import KubernetesReplica

            assert isinstance(h, KubernetesReplica)
            cluster.kubelet.kill(h.pod, signal.SIGKILL)
            await cluster.wait_pod(h.pod, lambda p: phase(p) in ("Failed", "Succeeded"))

        yield Backend(
            name="kubernetes",
            new_provider=lambda: cluster.provider({"support": template, "sales": template}),
            command=lambda behaviour: (sys.executable, "-S", "-c", REPLICA_PY, behaviour),
            # An environment variable name with "=" is invalid in every
            # Kubernetes version: the API server answers 422.
            unstartable=lambda la: dataclasses.replace(la, env={**la.env, "BAD=NAME": "x"}),
            ready=listener.ready,
            kill_unwatched=kill,
            forced_exit_codes=(128 + signal.SIGKILL,),
            env={"READY_PORT": str(listener.port)},
            timeout_s=20.0,
        )
