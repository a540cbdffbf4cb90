"""Cluster mode for the SIP edge: calls at any member, jobs at the pool's owner.

Theory of operation (docs/cluster.md, "SIP calls")
--------------------------------------------------
Every member runs its own SIP edge. The member an INVITE reaches (the call's
*edge member*) keeps the call's transactions and dialog, since it is the one
the caller and the downstream talk to (its Record-Route names it); the job is
the pool owner's, as every job is, so one scheduler still places every call
of a pool and the cap stays exact.

`ClusterAdmission` is the edge's `AdmissionBackend` on every member. For
each admitted INVITE it first *claims* the call's key in the store
(`sip:<Call-ID>|<From tag>|<CSeq>` -> a fresh job id; `Coordinator.claim`,
one atomic script) and only then asks for the job. The claim answers the id
bound first: ours (a new call) or one another member bound (the caller's
proxy failed over to us and this is the INVITE sent again: the call is
*joined*, never requested a second time). It then joins that job at the
pool's owner's `SipCallHub` (`runtime/sip_hub.py`, the owner's half): in
process when this member owns the pool, else over one streamed `POST
/v1/cluster/sip/join` to the owner that stays open for the call's life and
carries the owner's answers as JSON lines (`joined`, `placed`, `refused`,
`ended`, `unknown`, `closed`). Cancel, release and the final the edge sent
go to the owner as `POST /v1/cluster/sip/control`. The store unreachable,
or no owner answering before the call's deadline: the trunk's refusal (503
+ Retry-After by default) naming `cluster_unavailable`. The owner changing
hands: the edge joins again at the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from trunkline.auth import admin_token
from trunkline.cluster import ClusterUnavailable, Coordinator
from trunkline.runtime.cluster import ClusterNode, ClusterRefusal
from trunkline.runtime.dispatcher import Dispatcher, new_id
from trunkline.runtime.sip_admission import EdgeCallbacks
from trunkline.runtime.sip_hub import SipCallHub
from trunkline.sip.fields import header_tag

log = logging.getLogger("trunkline.sip")

__all__ = ["CONTROL_PATH", "JOIN_PATH", "KEEPALIVE_S", "ClusterAdmission", "call_key"]

# A call's claim outlives every retransmission of its INVITE: Timer B (64*T1).
CLAIM_EXTRA_S = 32.0
CONNECT_TIMEOUT_S = 1.0
# The owner writes a blank line this often; an edge that hears nothing for
# READ_TIMEOUT_S takes the owner for gone. It also bounds how late the owner
# sees a dead edge (a write to its closed socket fails).
KEEPALIVE_S = 1.0
READ_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 2.0
RETRY_S = 0.1
REJOIN_S = 30.0  # how long a placed call tries to rejoin its job after the owner changed

JOIN_PATH = "/v1/cluster/sip/join"
CONTROL_PATH = "/v1/cluster/sip/control"


def call_key(metadata: Mapping[str, str]) -> str:
    """The store key of a call: its Call-ID, From tag and CSeq number (what a
    proxy failing over keeps; its own Via branch may be new)."""
    tag = header_tag(metadata.get("sip.from", "")) or ""
    return f"sip:{metadata.get('sip.call_id', '')}|{tag}|{metadata.get('sip.cseq', '')}"


# ------------------------------------------------------------ the edge's half


@dataclasses.dataclass(slots=True)
class _EdgeCall:
    ref: str
    pool: str
    max_wait_s: float
    metadata: dict[str, str]
    deadline: float
    job_id: str = ""
    create: bool = False
    joined: bool = False  # the owner took us as this call's edge
    ever_joined: bool = False  # then a retry never requests the job again
    told: bool = False
    done: bool = False
    done_at: float = 0.0
    task: asyncio.Task[None] | None = None


class _LocalLink:
    """An edge of this member joined to this member's hub."""

    def __init__(self, owner: ClusterAdmission, call: _EdgeCall) -> None:
        self._a = owner
        self._call = call
        self.edge_id = owner.edge_id(call)

    def joined(self) -> None:
        self._call.joined = self._call.ever_joined = True

    def placed(self, job_id: str, worker_id: str) -> None:
        self._a._placed(self._call, job_id, worker_id)

    def refused(self, reason: str) -> None:
        self._a._refused(self._call, reason)

    def ended(self) -> None:
        self._a._ended(self._call)

    def unknown(self) -> None:
        self._call.joined = False

    def close(self) -> None:
        return None


class ClusterAdmission:
    """The edge's half; see the module docstring. Implements
    `trunkline.sip.AdmissionBackend`; `edge` is the SipServer, `start()` and
    `aclose()` bracket its use."""

    def __init__(self, dispatcher: Dispatcher, api_key: str, api_secret: str) -> None:
        self._d = dispatcher
        self.hub = SipCallHub(dispatcher)
        self._node: ClusterNode | None = None
        self._store: Coordinator | None = None
        self._key, self._secret = api_key, api_secret
        self._token = ""
        self._token_at = -1e9
        self.edge: EdgeCallbacks | None = None
        self._calls: dict[str, _EdgeCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.joined_elsewhere = 0  # INVITEs that found their call claimed by another edge

    def bind(self, node: ClusterNode, store: Coordinator) -> None:
        """This member, and the store the calls' claims go to (before start)."""
        self._node, self._store = node, store

    @property
    def node(self) -> ClusterNode:
        assert self._node is not None, "ClusterAdmission.bind was not called"
        return self._node

    async def start(self) -> None:
        # No connection limit: each remote call keeps one stream open.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._session is not None:
            await self._session.close()

    def edge_id(self, call: _EdgeCall) -> str:
        return f"{self.node.member}/{call.ref}"

    # --------------------------------------------------- AdmissionBackend

    def request(
        self, call_ref: str, pool: str, max_wait_s: float, metadata: Mapping[str, str]
    ) -> None:
        loop = asyncio.get_running_loop()
        call = _EdgeCall(call_ref, pool, max_wait_s, dict(metadata), loop.time() + max_wait_s)
        self._calls[call_ref] = call
        call.task = self._spawn(self._run(call))

    def cancel(self, call_ref: str, reason: str) -> None:
        self._finish(call_ref, "cancel", reason)

    def release(self, call_ref: str, outcome: str) -> None:
        self._finish(call_ref, "release", outcome)

    def final_sent(self, call_ref: str, status: int) -> None:
        call = self._calls.get(call_ref)
        if call is None or not call.joined:
            return
        if not call.done:
            self._control(call, "final", str(status))
        elif self.node.may_act(call.pool):
            # Sent from inside the job's end here: it still reaches its record.
            self.hub.control("final", call.job_id, self.edge_id(call), str(status))

    def has_capacity(self, pool: str) -> bool:
        """At the owner its scheduler's answer; elsewhere True while the pool
        has an owner (the call's admission decides)."""
        node = self.node
        if node.may_act(pool):
            return self._d.pool_has_capacity(pool)
        return node.store_ok and node.lease_of(pool) is not None

    # ------------------------------------------------- answers to the edge

    def _placed(self, call: _EdgeCall, job_id: str, worker_id: str) -> None:
        if call.told or call.done or self.edge is None:
            return
        call.told = True
        self.edge.on_placed(call.ref, job_id, worker_id)

    def _refused(self, call: _EdgeCall, reason: str) -> None:
        if call.done:
            return
        call.done = True
        try:
            # The edge's final_sent comes from inside these (the call still known).
            if self.edge is not None:
                if call.told:
                    self.edge.on_job_ended(call.job_id)
                else:
                    self.edge.on_refused(call.ref, reason)
        finally:
            self._calls.pop(call.ref, None)

    def _ended(self, call: _EdgeCall) -> None:
        if call.done:
            return
        call.done = True
        try:
            if self.edge is not None:
                self.edge.on_job_ended(call.job_id)
        finally:
            self._calls.pop(call.ref, None)

    def _finish(self, call_ref: str, op: str, detail: str) -> None:
        """The edge is done with the call: tell the owner, once."""
        call = self._calls.pop(call_ref, None)
        if call is None or call.done:
            return
        call.done = True
        call.done_at = asyncio.get_running_loop().time()
        if call.job_id and (call.joined or call.create):
            self._control(call, op, detail)
        elif call.task is not None:
            call.task.cancel()

    # ---------------------------------------------------------- the work

    async def _run(self, call: _EdgeCall) -> None:
        node = self.node
        fresh = new_id("AJ_")
        ttl_ms = round((call.max_wait_s + CLAIM_EXTRA_S) * 1000)
        store = self._store
        assert store is not None
        try:
            got = await store.claim(call_key(call.metadata), fresh, ttl_ms)
        except ClusterUnavailable as exc:
            self._refused(call, f"cluster_unavailable: the coordination store: {exc}")
            return
        call.job_id, call.create = got, got == fresh
        if not call.create:
            self.joined_elsewhere += 1
            log.info(
                "sip call joined at another member's job",
                extra={"call_ref": call.ref, "job_id": got},
            )
        loop = asyncio.get_running_loop()
        why = "no pool owner answered"
        tried = False
        while not call.done:
            limit = call.deadline + (REJOIN_S if call.told else 0.0)
            if tried and loop.time() >= limit:
                break  # at least one try, also with max_wait_s = 0
            tried = True
            if node.may_act(call.pool):
                try:
                    await self.hub.join(
                        got,
                        call.pool,
                        max_wait_s=max(0.0, call.deadline - loop.time()),
                        room=f"sip-{call.ref}",
                        metadata=call.metadata,
                        create=call.create and not call.ever_joined,
                        link=_LocalLink(self, call),
                    )
                except ClusterRefusal as exc:
                    why = exc.message
                else:
                    if call.joined or call.done:
                        return
            else:
                url = node.owner_url(call.pool)
                if url:
                    why = await self._remote(call, url)
                    if call.done:
                        return
                else:
                    why = node.refusal(call.pool).message
            # Not a test's wait: the owner is changing hands or not known yet.
            await asyncio.sleep(RETRY_S)
        if not call.told:
            self._refused(call, f"cluster_unavailable: {why}")

    async def _remote(self, call: _EdgeCall, url: str) -> str:
        """One join at `url`, read to its end; why it ended without an answer."""
        session = self._session
        assert session is not None
        loop = asyncio.get_running_loop()
        body = {
            "job_id": call.job_id,
            "pool": call.pool,
            "max_wait_s": max(0.0, call.deadline - loop.time()),
            "room": f"sip-{call.ref}",
            "metadata": call.metadata,
            "create": call.create and not call.ever_joined,
            "edge": self.edge_id(call),
        }
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        try:
            async with session.post(
                url + JOIN_PATH, json=body, headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status != 200:
                    return f"pool owner at {url} answered {resp.status}"
                async for raw in resp.content:
                    line = raw.strip()
                    if line and self._line(call, json.loads(line)):
                        return f"pool owner at {url} did not know the call's job"
                    if call.done and loop.time() - call.done_at > 2 * CONTROL_TIMEOUT_S:
                        return "answered"  # the owner never closed it after our control
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return f"pool owner at {url} unreachable ({type(exc).__name__})"
        call.joined = False
        return f"pool owner at {url} closed the call's link"

    def _line(self, call: _EdgeCall, msg: dict[str, Any]) -> bool:
        """Act on one line from the owner; True when it was the last."""
        event = msg.get("event")
        if event == "joined":
            call.joined = call.ever_joined = True
        elif event == "placed":
            self._placed(call, str(msg.get("job_id", "")), str(msg.get("worker_id", "")))
        elif event == "refused":
            self._refused(call, str(msg.get("reason", "")))
        elif event == "ended":
            self._ended(call)
        elif event == "unknown":
            call.joined = False
        elif event == "closed":
            call.done = True
        return event in ("refused", "ended", "unknown", "closed")

    def _control(self, call: _EdgeCall, op: str, detail: str) -> None:
        if self.node.may_act(call.pool):
            self.hub.control(op, call.job_id, self.edge_id(call), detail)
            return
        self._spawn(self._remote_control(call, op, detail))

    async def _remote_control(self, call: _EdgeCall, op: str, detail: str) -> None:
        url = self.node.owner_url(call.pool)
        session = self._session
        ok = False
        if url and session is not None:
            body = {"op": op, "job_id": call.job_id, "edge": self.edge_id(call), "detail": detail}
            timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.post(
                    url + CONTROL_PATH, json=body, headers=self._headers(), timeout=timeout
                ) as resp:
                    ok = resp.status == 200
        if not ok and op != "final" and call.task is not None:
            # The owner did not hear it: break the call's link instead, so the
            # owner ends a placed job as an edge lost.
            call.task.cancel()

    def _headers(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._token_at > 300.0:
            self._token = admin_token(self._key, self._secret)
            self._token_at = now
        return {"Authorization": f"Bearer {self._token}"}

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sip cluster task failed", exc_info=task.exception())
