"""A fake kubelet inside the fake API server: runs each pod's first container
command as a local process with the pod's environment.

Pod life, as a real kubelet reports it (restartPolicy Never):

    created ─> scheduled (spec.nodeName, PodScheduled) ─> ContainerCreating
      ─> Running (containerStatuses running, Ready) ─> the process exits
      ─> Succeeded (exit 0, "Completed") / Failed ("Error", "OOMKilled")

- Scheduling fails (PodScheduled False, reason Unschedulable; the pod stays
  Pending) when the pod's nodeSelector does not match the node's labels.
- An image whose registry host ends in `.invalid` cannot be pulled: waiting
  ErrImagePull, then ImagePullBackOff, for as long as the pod exists.
- A container without `command` cannot start here (this kubelet knows no
  image entrypoints): waiting CreateContainerError.
- Graceful deletion: SIGTERM to the process when `deletionTimestamp` appears
  (or is brought forward), SIGKILL to its process group when the grace runs
  out; once it is gone the status says how it ended and the pod object is
  removed (DELETED). A pod removed at once (grace 0) is SIGKILLed.
- `oom_kill(name)` plays the kernel's OOM killer: SIGKILL, reported as
  OOMKilled with exit code 137. `kill(name, sig)` is any other death.

`simulated=True` runs no process: a container runs until the pod is deleted
(then it exits 0 on SIGTERM unless the pod is in `stubborn`) or `exit(name,
code)` is called; for fast tests of many interleavings.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
from pathlib import Path
from typing import Any

from providers.k8s.apiserver import FakeApiServer
from providers.k8s.store import Event, Obj, now_rfc3339

NODE = "fake-node-1"


class _Run:
    """One pod's container as the kubelet runs it."""

    def __init__(self, ns: str, name: str, uid: str) -> None:
        self.ns, self.name, self.uid = ns, name, uid
        self.task: asyncio.Task[None] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.term_sent = False
        self.kill_at: float | None = None
        self.kill_timer: asyncio.TimerHandle | None = None
        self.oom = False
        self.started = asyncio.Event()
        self.removed = False
        self.spawning = False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif not self.exited.done():
            self.exited.set_result(-signal.SIGKILL)


class FakeKubelet:
    """See the module docstring. Attaches itself to `api` (one node)."""

    def __init__(
        self,
        api: FakeApiServer,
        log_dir: Path,
        *,
        simulated: bool = False,
        node_labels: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        pull_s: float = 0.0,
    ) -> None:
        self.api = api
        self.store = api.store
        self.log_dir = log_dir
        self.simulated = simulated
        self.node_labels = node_labels or {
            "kubernetes.io/hostname": NODE,
            "kubernetes.io/os": "linux",
        }
        self.extra_env = extra_env or {}
        self.pull_s = pull_s
        self.stubborn: set[str] = set()  # simulated pods that ignore SIGTERM
        self.runs: dict[tuple[str, str], _Run] = {}
        self.started_names: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe = self.store.subscribe(self._on_event)
        api.kubelet = self
        log_dir.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- controls

    def run_of(self, name: str, ns: str = "default") -> _Run:
        return self.runs[(ns, name)]

    def pid(self, name: str, ns: str = "default") -> int | None:
        run = self.runs.get((ns, name))
        return run.proc.pid if run is not None and run.proc is not None else None

    def kill(self, name: str, sig: int = signal.SIGKILL, ns: str = "default") -> None:
        """The container's process dies (as if it crashed): signal it."""
        run = self.runs[(ns, name)]
        if self.simulated:
            if not run.exited.done():
                run.exited.set_result(-sig)
        else:
            run.signal(sig)

    def oom_kill(self, name: str, ns: str = "default") -> None:
        """The kernel OOM-kills the container: reported as OOMKilled, exit code 137."""
        run = self.runs[(ns, name)]
        run.oom = True
        self.kill(name, signal.SIGKILL, ns)

    def exit(self, name: str, code: int, ns: str = "default") -> None:
        """A simulated container exits with `code`."""
        run = self.runs[(ns, name)]
        if not run.exited.done():
            run.exited.set_result(code)

    def running(self, ns: str = "default") -> list[str]:
        return sorted(
            n
            for (s, n), r in self.runs.items()
            if s == ns and r.started.is_set() and not r.exited.done()
        )

    async def aclose(self) -> None:
        self._unsubscribe()
        for run in self.runs.values():
            run.kill_group()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    # ---------------------------------------------------------------- events

    def _on_event(self, ev: Event) -> None:
        # Called inside the store's commit: never write back from here.
        if ev.resource != "pods":
            return
        meta = ev.obj["metadata"]
        key = (ev.namespace, meta["name"])
        run = self.runs.get(key)
        if run is not None and run.uid != meta["uid"]:
            run = None
        if ev.type == "ADDED" and run is None:
            run = _Run(ev.namespace, meta["name"], meta["uid"])
            self.runs[key] = run
            self._spawn(self._lifecycle(run))
        elif ev.type == "MODIFIED" and run is not None and meta.get("deletionTimestamp"):
            self._terminate(run, float(meta.get("deletionGracePeriodSeconds", 0)))
        elif ev.type == "DELETED" and run is not None:
            run.removed = True
            run.kill_group()
            if run.task is not None and not run.started.is_set():
                run.task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _terminate(self, run: _Run, grace: float) -> None:
        if not run.started.is_set():
            # Nothing runs yet: the pod can go as soon as its startup is abandoned
            # (a process being spawned is terminated once it is there).
            if run.task is not None and not run.spawning:
                run.task.cancel()
            return
        loop = asyncio.get_running_loop()
        kill_at = loop.time() + grace
        if run.kill_at is not None and run.kill_at <= kill_at:
            return
        run.kill_at = kill_at
        if run.kill_timer is not None:
            run.kill_timer.cancel()
        if not run.term_sent:
            run.term_sent = True
            if self.simulated:
                if run.name not in self.stubborn and not run.exited.done():
                    run.exited.set_result(0)
            else:
                run.signal(signal.SIGTERM)
        run.kill_timer = loop.call_at(kill_at, run.kill_group)

    # ------------------------------------------------------------- lifecycle

    def _pod(self, run: _Run) -> Obj | None:
        pod = self.store.get("pods", run.ns, run.name)
        if pod is None or pod["metadata"]["uid"] != run.uid:
            return None
        return copy.deepcopy(pod)

    def _write(self, run: _Run, change: Any) -> Obj | None:
        pod = self._pod(run)
        if pod is None:
            return None
        change(pod)
        return self.store.update("pods", run.ns, pod)

    async def _lifecycle(self, run: _Run) -> None:
        run.task = asyncio.current_task()
        try:
            await self._run(run)
        except asyncio.CancelledError:
            pass
        finally:
            # A pod being deleted goes once nothing of it runs any more.
            pod = self._pod(run)
            if pod is not None and pod["metadata"].get("deletionTimestamp"):
                self.store.remove("pods", run.ns, run.name)

    async def _run(self, run: _Run) -> None:
        await asyncio.sleep(0)  # let the create's response go out first
        pod = self._pod(run)
        if pod is None:
            return
        spec = pod["spec"]
        selector = spec.get("nodeSelector") or {}
        misfit = {k: v for k, v in selector.items() if self.node_labels.get(k) != v}
        if misfit:
            message = (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            )

            def unschedulable(p: Obj) -> None:
                p["status"]["conditions"] = [
                    _cond("PodScheduled", "False", "Unschedulable", message)
                ]

            self._write(run, unschedulable)
            await asyncio.Future()  # stays Pending until deleted

        def bind(p: Obj) -> None:
            p["spec"]["nodeName"] = NODE
            p["status"].update(
                hostIP="127.0.0.1",
                startTime=now_rfc3339(),
                conditions=[_cond("PodScheduled", "True")],
                containerStatuses=[
                    _status(c, {"waiting": {"reason": "ContainerCreating"}})
                    for c in spec["containers"]
                ],
            )

        self._write(run, bind)
        c = spec["containers"][0]
        image: str = c["image"]
        host = image.split("/")[0] if "/" in image else ""
        if host.split(":")[0].endswith(".invalid"):
            msg = f'Failed to pull image "{image}": dial tcp: lookup {host}: no such host'
            self._write(run, lambda p: _waiting(p, c, "ErrImagePull", msg))
            await asyncio.sleep(0.05)
            back = f'Back-off pulling image "{image}"'
            self._write(run, lambda p: _waiting(p, c, "ImagePullBackOff", back))
            await asyncio.Future()
        if self.pull_s:
            await asyncio.sleep(self.pull_s)
        argv = [*(c.get("command") or []), *(c.get("args") or [])]
        if not c.get("command") and not self.simulated:
            msg = "fake kubelet: image entrypoints are unknown here; set the container's command"
            self._write(run, lambda p: _waiting(p, c, "CreateContainerError", msg))
            await asyncio.Future()
        pod = self._pod(run)
        if pod is None:
            return
        if not self.simulated:
            env = {**os.environ, **self.extra_env, **_env(pod, c)}
            log = self.log_dir / f"{run.ns}_{run.name}.log"
            run.spawning = True
            try:
                with log.open("ab") as out:
                    run.proc = await asyncio.create_subprocess_exec(
                        *argv,
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=asyncio.subprocess.STDOUT,
                        start_new_session=True,
                        cwd=c.get("workingDir") or None,
                    )
            except OSError as exc:
                run.spawning = False
                why = str(exc)
                self._write(run, lambda p: _start_error(p, c, why))
                return
            proc = run.proc
            run.spawning = False

            async def reap() -> None:
                code = await proc.wait()
                if not run.exited.done():
                    run.exited.set_result(code)

            self._spawn(reap())
        run.started.set()
        self.started_names.append(run.name)
        started_at = now_rfc3339()

        def running(p: Obj) -> None:
            p["status"].update(
                phase="Running",
                podIP="127.0.0.1",
                conditions=[_cond("PodScheduled", "True"), _cond("Ready", "True")],
                containerStatuses=[
                    _status(c, {"running": {"startedAt": started_at}}, ready=True, started=True)
                ],
            )

        self._write(run, running)
        pod = self._pod(run)
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            self._terminate(run, float(pod["metadata"]["deletionGracePeriodSeconds"]))
        code = await run.exited
        if run.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.proc.pid, signal.SIGKILL)  # what the container left
        if run.kill_timer is not None:
            run.kill_timer.cancel()
        exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if run.oom else ("Completed" if exit_code == 0 else "Error")
        finished = now_rfc3339()

        def terminated(p: Obj) -> None:
            p["status"].update(
                phase="Succeeded" if exit_code == 0 else "Failed",
                conditions=[_cond("PodScheduled", "True"), _cond("Ready", "False")],
                containerStatuses=[
                    _status(
                        c,
                        {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": reason,
                                "startedAt": started_at,
                                "finishedAt": finished,
                            }
                        },
                    )
                ],
            )

        self._write(run, terminated)


def _cond(kind: str, status: str, reason: str = "", message: str = "") -> Obj:
    c: Obj = {"type": kind, "status": status, "lastTransitionTime": now_rfc3339()}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def _status(c: Obj, state: Obj, *, ready: bool = False, started: bool = False) -> Obj:
    return {
        "name": c["name"],
        "image": c["image"],
        "imageID": "",
        "ready": ready,
        "started": started,
        "restartCount": 0,
        "state": state,
    }


def _start_error(p: Obj, c: Obj, message: str) -> None:
    p["status"]["phase"] = "Failed"
    state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message}}
    p["status"]["containerStatuses"] = [_status(c, state)]


def _waiting(p: Obj, c: Obj, reason: str, message: str) -> None:
    p["status"]["containerStatuses"] = [
        _status(c, {"waiting": {"reason": reason, "message": message}})
    ]


def _env(pod: Obj, c: Obj) -> dict[str, str]:
    fields = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": NODE,
        "status.podIP": "127.0.0.1",
    }
    out: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "fieldRef" in (e.get("valueFrom") or {}):
            out[e["name"]] = fields.get(e["valueFrom"]["fieldRef"]["fieldPath"], "")
    return out
