"""The Kubernetes provider: each replica is a pod that trunkline creates, watches
and deletes itself (operator style), so scale-down removes exactly the pod
the autoscaler drained, never one picked by a ReplicaSet.

Theory of operation
-------------------
- Start. The pool's pod template (kubernetes_pods.build_pod) becomes one pod
  named `<instance>-<replica id>-<5 chars of the token's digest>`: a create
  retried after a lost answer meets its own pod (409 AlreadyExists with the
  same token) and takes it instead of making a second one. A create whose
  outcome stays unknown (API server unreachable for the whole retry budget)
  raises `ProviderError` and leaves a tombstone: if that pod turns up later,
  it is deleted before anyone could use it. An invalid pod (422), a missing
  namespace or a forbidden create raise at once with the server's message.
- Watch. One list+watch per provider covers every pool's pods, selected by
  the instance labels (`kubernetes_watch.PodWatch`: paged lists, resumed
  watches, relist on 410 Expired). Only the few facts in `PodView` are kept
  per pod; this module hears each change (`pod_seen`, `pod_deleted`,
  `relisted`) and decides what it means for its replicas.
- End, exactly once. A replica ends when its pod reaches Succeeded/Failed
  (exit code and reason from the container status: "exited with code 3",
  "OOMKilled (exit code 137)"), when it cannot start (ImagePullBackOff and
  the other fatal waiting reasons; Unschedulable, after
  `unschedulable_timeout_s`): "failed to start: <reason>: <message>", or when
  its pod is deleted, or missing from a relist. Every path goes through
  `_ended`, which calls `on_exit` once, from the loop. A finished or failed
  pod is then deleted.
- Stop. `DELETE` with `gracePeriodSeconds` (whole seconds, at least 1) and
  the pod's uid as precondition; the kubelet sends SIGTERM and SIGKILL after
  the grace. A second stop sends a shorter grace only if it brings the forced
  end forward (the API server only shortens). If the API server cannot be
  reached the delete keeps being retried in the background; nothing is
  forgotten meanwhile.
- Outages. While the API server is unreachable nothing is concluded: no
  replica is reported gone for lack of news, none is started twice. When it
  answers again the watch resumes (or relists) and whatever happened
  meanwhile is reported then.
- Restart. `list_existing` returns the live pods of this instance that no
  replica of this run watches (pool, replica id from annotations, token from
  the container env); finished ones are deleted, terminating ones left to
  finish.

Pods carry `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` (the
cluster autoscaler does not remove their node to consolidate) and a
`terminationGracePeriodSeconds` of at least the pool's drain limit (an
eviction or node drain by someone else gives the worker that long to finish
its calls); see docs/kubernetes.md for what this does not protect against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

from trunkline.providers import kubernetes_api as kapi
from trunkline.providers.kubernetes_pods import (
    PodTemplate,
    PodView,
    build_pod,
    load_template,
    pod_name,
    selector,
)
from trunkline.providers.kubernetes_replica import KubernetesReplica, PodPool
from trunkline.providers.kubernetes_watch import PodWatch
from trunkline.providers.protocol import (
    ExitCallback,
    Launch,
    ProviderError,
    ReplicaHandle,
    check_adoptable,
)

__all__ = ["OWNER_KINDS", "KubernetesProvider", "KubernetesReplica", "PodPool"]

log = logging.getLogger("trunkline.providers")

OWNER_KINDS = kapi.OWNER_KINDS


def _name_for(instance: str, launch: Launch) -> str:
    digest = hashlib.sha256(launch.token.encode()).hexdigest()[:5]
    return pod_name(instance, f"{launch.replica_id}-{digest}")


class KubernetesProvider:
    """Replicas as pods; see the module docstring.

    `pools` maps each pool this provider runs to its `PodPool`. `kubeconfig`,
    `context`, `namespace`: where the cluster is (see kubernetes_api). `owner`
    ("Deployment/trunkline") is set as each pod's owner reference, so deleting
    it collects the pods. `instance` labels this trunkline's pods apart from
    another's in the same namespace. `on_shutdown`: what `aclose` does with
    the pods: "leave" (the default) hands them over like `detach`, so that a
    restarted trunkline (a rollout, an evicted server pod) adopts them with
    their calls; "delete" stops them as the protocol's `aclose` describes.
    The remaining knobs are for tests.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        pools: Mapping[str, PodPool],
        kubeconfig: str = "",
        context: str = "",
        namespace: str = "",
        owner: str = "",
        instance: str = "trunkline",
        unschedulable_timeout_s: float = 0.0,
        on_shutdown: str = "leave",
        request_budget_s: float = 10.0,
        confirm_s: float = 30.0,
        watch_timeout_s: int = 240,
        page_size: int = 500,
        backoff: kapi.Backoff | None = None,
    ) -> None:
        self._templates: dict[str, PodTemplate] = {
            pool: load_template(pp.template) for pool, pp in pools.items()
        }
        self._grace = {pool: pp.min_grace_s for pool, pp in pools.items()}
        # (pool, version) -> its template: a rollout's new version and, for an
        # abort, the old one are each made from what they were loaded from.
        self._versions: dict[tuple[str, str], PodTemplate] = {}
        self._where = {"kubeconfig": kubeconfig, "context": context, "namespace": namespace}
        if owner and owner.partition("/")[0] not in OWNER_KINDS:
            raise ProviderError(f"owner {owner!r}: must be Kind/name, Kind one of {OWNER_KINDS}")
        self.owner = owner
        self.instance = instance
        self.unschedulable_timeout_s = unschedulable_timeout_s
        if on_shutdown not in ("leave", "delete"):
            raise ProviderError(f"on_shutdown {on_shutdown!r}: must be 'leave' or 'delete'")
        self.on_shutdown = on_shutdown
        self.request_budget_s = request_budget_s
        self.confirm_s = confirm_s
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.backoff = backoff or kapi.Backoff()
        self._api: kapi.Api | None = None
        self._owner_ref: dict[str, Any] | None = None
        self._connecting = asyncio.Lock()
        self._watched: dict[str, KubernetesReplica] = {}  # replica id -> handle
        self._by_pod: dict[str, KubernetesReplica] = {}
        self._tombstones: dict[str, str] = {}  # pod name -> token: delete if it turns up
        self._pods = PodWatch(
            self,
            self._client,
            selector=selector(instance),
            backoff=self.backoff,
            request_budget_s=request_budget_s,
            watch_timeout_s=watch_timeout_s,
            page_size=page_size,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starting = 0
        self._no_starts = asyncio.Event()
        self._no_starts.set()
        self._closed = False

    # --------------------------------------------------------------- plumbing

    @property
    def namespace(self) -> str:
        return self._api.namespace if self._api else self._where["namespace"] or ""

    @property
    def api(self) -> kapi.Api | None:
        return self._api

    @property
    def reachable(self) -> bool:
        """Whether the last list or watch reached the API server."""
        return self._pods.reachable

    @property
    def stats(self) -> dict[str, int]:
        """Relists, watches, watch errors and events seen so far."""
        return self._pods.stats

    @property
    def _rv(self) -> str | None:
        # The last resource version seen: tests and benchmarks wait on it.
        return self._pods.rv

    @property
    def _cache(self) -> dict[str, PodView]:
        return self._pods.cache

    async def _client(self) -> kapi.Api:
        async with self._connecting:
            if self._api is None:
                api = await kapi.connect(backoff=self.backoff, **self._where)
                if self.owner:
                    try:
                        self._owner_ref = await api.owner_reference(self.owner)
                    except (ProviderError, kapi.Unavailable):
                        await api.close()
                        raise
                self._api = api
            return self._api

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ensure_informer(self) -> None:
        if not self._closed:
            self._pods.start()

    def _own(self, handle: ReplicaHandle) -> KubernetesReplica:
        if not isinstance(handle, KubernetesReplica):
            raise ProviderError(f"{handle!r} is not a Kubernetes replica")
        return handle

    # ------------------------------------------------------------------ start

    async def start(self, launch: Launch, on_exit: ExitCallback) -> KubernetesReplica:
        """Create the replica's pod; `ProviderError` if the API server refuses it
        or cannot be reached (see the module docstring)."""
        rid = launch.replica_id
        if self._closed:
            raise ProviderError(f"cannot start replica {rid!r}: the Kubernetes provider is closed")
        template = self._template_for(launch)
        if rid in self._watched:
            raise ProviderError(
                f"replica {rid!r} is still running ({self._watched[rid].location}); use another id"
            )
        self._starting += 1
        self._no_starts.clear()
        try:
            return await self._start(launch, template, on_exit)
        finally:
            self._starting -= 1
            if not self._starting:
                self._no_starts.set()

    def _template_for(self, launch: Launch) -> PodTemplate:
        """The template of the launch's version: loaded once per (pool, version)
        from `launch.pod_template` (else the pool's own); `ProviderError` if none."""
        key = (launch.pool, launch.version)
        template = self._versions.get(key) if launch.version else None
        if template is not None:
            return template
        own = self._templates.get(launch.pool)
        template = load_template(launch.pod_template) if launch.pod_template else own
        if template is None:
            raise ProviderError(
                f"pool {launch.pool!r} has no pod template: set pod_template in its section"
            )
        if launch.version:
            self._versions[key] = template
        return template

    async def _start(
        self, launch: Launch, template: PodTemplate, on_exit: ExitCallback
    ) -> KubernetesReplica:
        rid = launch.replica_id
        try:
            api = await self._client()
        except kapi.Unavailable as exc:
            raise ProviderError(f"cannot start replica {rid!r}: {exc}") from None
        self._ensure_informer()
        live = self._live_pod_of(rid)
        if live is not None:
            raise ProviderError(
                f"replica {rid!r} is still running (pod {live.name}); adopt it "
                "(list_existing) or use another id"
            )
        body = build_pod(
            template,
            launch,
            instance=self.instance,
            namespace=api.namespace,
            min_grace_s=self._grace.get(launch.pool, 0.0),
            owner=self._owner_ref,
        )
        name = _name_for(self.instance, launch)
        body["metadata"]["name"] = name
        try:
            reply = await api.call(
                f"create pod {name}",
                lambda: api.core.create_namespaced_pod(api.namespace, body, _preload_content=False),
                budget_s=self.request_budget_s,
                retry_conflict=True,
            )
        except kapi.Unavailable as exc:
            self._tombstones[name] = launch.token
            seen = self._cache.get(name)
            if seen is not None and seen.token == launch.token:
                del self._tombstones[name]  # the watch saw it made: delete it now
                self._cleanup(seen)
            raise ProviderError(
                f"cannot create pod {name} for replica {rid!r}: {exc}; if the pod was created "
                "after all, it is deleted once the API server answers"
            ) from None
        if reply.status == 409 and reply.reason == "AlreadyExists":
            reply = await self._read(api, name)
            if not reply.ok or PodView.of(reply.body).token != launch.token:
                raise ProviderError(
                    f"pod {name} for replica {rid!r} exists and is not this launch's; "
                    "use another replica id"
                )
        elif not reply.ok:
            raise ProviderError(
                f"the API server refused pod {name} for {rid!r}: {reply.describe()}"
            )
        view = PodView.of(reply.body)
        h = KubernetesReplica(
            rid,
            launch.pool,
            launch.token,
            name,
            api.namespace,
            uid=view.uid,
            phase=view.phase,
            version=launch.version,
        )
        self._watch(h, on_exit, adopted=False)
        log.info(
            "replica pod created",
            extra={"replica": rid, "pod": name, "namespace": api.namespace},
        )
        return h

    async def _read(self, api: kapi.Api, name: str) -> kapi.Reply:
        try:
            return await api.call(
                f"get pod {name}",
                lambda: api.core.read_namespaced_pod(name, api.namespace, _preload_content=False),
                budget_s=self.request_budget_s,
            )
        except kapi.Unavailable as exc:
            raise ProviderError(str(exc)) from None

    def _live_pod_of(self, rid: str) -> PodView | None:
        for v in self._cache.values():
            if v.replica_id == rid and not v.terminal and not v.deleting:
                return v
        return None

    def _watch(self, h: KubernetesReplica, on_exit: ExitCallback, *, adopted: bool) -> None:
        """Start watching `h`; what the cache already knows of its pod is applied
        from the loop (never inside start/adopt)."""
        h._on_exit = on_exit
        h._known_epoch = self._pods.epoch
        self._watched[h.replica_id] = h
        self._by_pod[h.pod] = h
        asyncio.get_running_loop().call_soon(self._recheck, h, adopted)

    def _recheck(self, h: KubernetesReplica, adopted: bool) -> None:
        view = self._cache.get(h.pod)
        if view is not None and view.uid == h.uid:
            self._observe(view)
        elif adopted:
            # Listed from the cache, gone from it since: its DELETED event came
            # before anyone watched it.
            self._ended(h, None, "pod gone before it was adopted (exit status unknown)")

    # ------------------------------------------------------------------- stop

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Delete the pod with a grace period of `grace_s` (whole seconds, >= 1)."""
        h = self._own(handle)
        if h.done:
            return
        secs = max(1, math.ceil(grace_s))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + secs
        if h._deadline is not None and h._deadline <= deadline:
            return
        h._deadline = deadline
        if not await self._delete(h, secs, budget_s=min(self.request_budget_s, 2.0)):
            self._spawn(self._delete_until_done(h, secs, deadline))

    async def _delete(self, h: KubernetesReplica, secs: int, *, budget_s: float) -> bool:
        """One delete (with retries inside `budget_s`); False if it must be retried."""
        try:
            api = await self._client()
        except kapi.Unavailable:
            return False
        body = {"preconditions": {"uid": h.uid}} if h.uid else None
        try:
            reply = await api.call(
                f"delete pod {h.pod}",
                lambda: api.core.delete_namespaced_pod(
                    h.pod,
                    api.namespace,
                    grace_period_seconds=secs,
                    body=body,
                    _preload_content=False,
                ),
                budget_s=budget_s,
            )
        except kapi.Unavailable as exc:
            log.warning(
                "pod delete not confirmed; retrying", extra={"pod": h.pod, "error": str(exc)}
            )
            return False
        if reply.status in (404, 409):
            # Gone already (or replaced: the uid precondition failed). The watch
            # reports it; a relist would, if the watch missed it.
            return True
        if not reply.ok:
            log.error(
                "pod delete refused",
                extra={
                    "pod": h.pod,
                    "error": reply.describe(),
                    "fix": "the Role must allow delete on pods",
                },
            )
            h._deadline = None  # a later stop tries again
        return True

    async def _delete_until_done(self, h: KubernetesReplica, secs: int, deadline: float) -> None:
        attempt = 0
        while not h.done and not h._detached and h._deadline == deadline:
            attempt += 1
            await asyncio.sleep(self.backoff.delay(attempt))
            if await self._delete(h, secs, budget_s=self.request_budget_s):
                return

    def _cleanup(self, view: PodView) -> None:
        """Delete a finished or failed pod (no process runs in it) in the background."""
        if view.deleting:
            return
        self._spawn(self._delete_view(view))

    async def _delete_view(self, view: PodView) -> None:
        try:
            api = await self._client()
            await api.call(
                f"delete pod {view.name}",
                lambda: api.core.delete_namespaced_pod(
                    view.name,
                    api.namespace,
                    grace_period_seconds=1,
                    body={"preconditions": {"uid": view.uid}},
                    _preload_content=False,
                ),
                budget_s=self.request_budget_s,
            )
        except (kapi.Unavailable, ProviderError) as exc:
            log.warning("finished pod not deleted", extra={"pod": view.name, "error": str(exc)})

    # ------------------------------------------------------------- adoption

    async def list_existing(self, pool: str | None = None) -> list[ReplicaHandle]:
        """Live pods of this instance (of `pool`) that no replica here watches."""
        if self._closed:
            return []
        try:
            api = await self._client()
        except kapi.Unavailable as exc:
            raise ProviderError(f"cannot list pods: {exc}") from None
        self._ensure_informer()
        try:
            await asyncio.wait_for(self._pods.synced.wait(), self.request_budget_s)
        except TimeoutError:
            raise ProviderError(
                f"cannot list pods in namespace {api.namespace!r}: the API server did not answer "
                f"within {self.request_budget_s:g} s"
            ) from None
        found: list[ReplicaHandle] = []
        for v in sorted(self._cache.values(), key=lambda v: v.name):
            if v.name in self._by_pod or not v.replica_id:
                continue
            if v.terminal or v.start_failure:
                self._cleanup(v)
                continue
            if v.deleting or (pool is not None and v.pool != pool):
                continue
            found.append(
                KubernetesReplica(
                    v.replica_id,
                    v.pool,
                    v.token,
                    v.name,
                    api.namespace,
                    uid=v.uid,
                    node=v.node,
                    phase=v.phase,
                    waiting=v.waiting,
                    version=v.version,
                )
            )
        return found

    def adopt(self, handle: ReplicaHandle, on_exit: ExitCallback) -> None:
        """Watch a listed pod; its end is reported once (at once if it has gone)."""
        h = self._own(handle)
        watched = h.replica_id in self._watched or h._on_exit is not None or h.done
        check_adoptable(h.replica_id, closed=self._closed, watched=watched)
        self._watch(h, on_exit, adopted=True)
        log.info("replica pod adopted", extra={"replica": h.replica_id, "pod": h.pod})

    # ------------------------------------------------- what the watch heard

    def pod_seen(self, view: PodView) -> None:
        """A pod listed, added or changed (`PodListener`)."""
        self._observe(view)

    def pod_deleted(self, view: PodView) -> None:
        """A pod deleted (`PodListener`): its replica ended."""
        h = self._by_pod.get(view.name)
        if h is not None and (not h.uid or h.uid == view.uid):
            code, detail = view.ended or (None, f"pod {view.name} deleted (exit status unknown)")
            self._ended(h, code, detail)

    def relisted(self, seen: Mapping[str, PodView], epoch: int) -> None:
        """A relist is complete (`PodListener`): a replica watched before it
        whose pod it did not find is gone; a tombstoned pod found is deleted."""
        for h in list(self._watched.values()):
            mine = seen.get(h.pod)
            if h._known_epoch < epoch and (mine is None or (h.uid and mine.uid != h.uid)):
                self._ended(h, None, "pod gone while the watch was down (exit status unknown)")
        for name, tok in list(self._tombstones.items()):
            found = seen.get(name)
            if found is not None and found.token == tok and name not in self._by_pod:
                self._cleanup(found)
            self._tombstones.pop(name, None)

    # ---------------------------------------------------------------- the end

    def _observe(self, view: PodView) -> None:
        h = self._by_pod.get(view.name)
        if h is None or h.done or (h.uid and view.uid != h.uid):
            if h is None and self._tombstones.get(view.name) == view.token:
                del self._tombstones[view.name]  # a create we gave up on happened after all
                self._cleanup(view)
            return
        h.uid = h.uid or view.uid
        h.node, h.phase = view.node, view.phase
        h.waiting = view.start_failure or view.unschedulable or view.waiting
        if view.ended is not None:
            self._ended(h, *view.ended)
            self._cleanup(view)
        elif view.start_failure:
            self._ended(h, None, f"failed to start: {view.start_failure}")
            self._cleanup(view)
        elif view.unschedulable and not view.deleting:
            if self.unschedulable_timeout_s <= 0:
                self._ended(h, None, f"failed to start: {view.unschedulable}")
                self._cleanup(view)
            elif h._timer is None:
                h._timer = asyncio.get_running_loop().call_later(
                    self.unschedulable_timeout_s, self._unschedulable_expired, h
                )
        elif h._timer is not None:
            h._timer.cancel()
            h._timer = None

    def _unschedulable_expired(self, h: KubernetesReplica) -> None:
        h._timer = None
        view = self._cache.get(h.pod)
        if view is not None and view.unschedulable and not h.done:
            self._ended(h, None, f"failed to start: {view.unschedulable}")
            self._cleanup(view)

    def _ended(self, h: KubernetesReplica, code: int | None, detail: str) -> None:
        """The replica is gone: forget it and call its `on_exit`, exactly once."""
        if h.done or h._detached:
            return
        h.done = True
        if h._timer is not None:
            h._timer.cancel()
            h._timer = None
        if self._watched.get(h.replica_id) is h:
            del self._watched[h.replica_id]
        if self._by_pod.get(h.pod) is h:
            del self._by_pod[h.pod]
        h._gone.set()
        log.info("replica pod ended", extra={"replica": h.replica_id, "pod": h.pod, "how": detail})
        on_exit, h._on_exit = h._on_exit, None
        if on_exit is not None:
            try:
                on_exit(code, detail)
            except Exception:
                log.exception("replica exit callback failed", extra={"replica": h.replica_id})

    def detach(self) -> None:
        """Leave every pod running and unwatched."""
        self._closed = True
        for h in self._watched.values():
            h._detached = True
            h._on_exit = None
            if h._timer is not None:
                h._timer.cancel()
        self._watched.clear()
        self._by_pod.clear()
        self._pods.cancel()

    async def aclose(self, grace_s: float) -> None:
        """Delete every watched pod; return once each end is reported (or, if the
        API server cannot confirm it within the grace plus `confirm_s`, reported
        as not confirmed)."""
        self._closed = True
        await self._no_starts.wait()  # a create in flight: its handle is watched after it
        if self.on_shutdown == "leave" and self._watched:
            log.info(
                "leaving replica pods running for the next server",
                extra={"pods": len(self._watched)},
            )
            self.detach()
        live = list(self._watched.values())
        for h in live:
            await self.stop(h, grace_s)
        waits = [asyncio.ensure_future(h._gone.wait()) for h in live if not h.done]
        if waits:
            deadline = grace_s + self.confirm_s
            await asyncio.wait(waits, timeout=deadline)
            for w in waits:
                w.cancel()
        for h in live:
            if not h.done:
                self._ended(h, None, "not confirmed gone at shutdown; no longer watched")
        informer = self._pods.cancel()
        if informer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await informer
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(1.0, min(grace_s, 5.0)))
        for t in list(self._tasks):
            t.cancel()
        if self._api is not None:
            await self._api.close()
            self._api = None
