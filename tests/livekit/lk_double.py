"""A test double of the LiveKit server's agent side (no LiveKit binary can be
installed here). aiohttp on loopback; each behaviour follows the named
function of livekit/livekit 788d4c3 (see /work/shared/LIVEKIT.md):

- `/agent` (`pkg/service/agentservice.go AgentSocketUpgrader.Upgrade`: no
  `video.agent` grant -> 401 before the upgrade; `HandshakeAgentWorker`:
  register within `RegisterTimeout` = 10 s, answered by
  `RegisterWorkerResponse`; then `DispatchWorkerSignal` per frame).
- A job request (`AgentHandler.JobRequest`): the psrpc affinity bid first
  (`JobRequestAffinity`: sum of max(0, target_load - load) over WS_AVAILABLE
  workers, no bid -> "no servers available"), collected for
  `affinity_wait_s`; then `selectWorkerWeightedByLoad` (weight 1 - load over
  WS_AVAILABLE workers not yet tried, random pick), `Worker.AssignJob`
  (AvailabilityRequest, wait `AssignJobTimeout` = 10 s; `terminate` -> the
  job ends JS_SUCCESS at once; not available -> the next worker; available
  -> a token minted like `protoagent.BuildAgentToken` and `JobAssignment{job,
  token}` with no URL), all bounded by psrpc's client timeout (3 s).
- Job status (`Worker.UpdateJobStatus`), termination (`Worker.TerminateJob`:
  JobTermination, then JS_SUCCESS, or JS_FAILED "agent worker left the room"
  when the agent participant left), worker status (`HandleUpdateWorker`),
  `MigrateJobRequest` (`HandleMigrateJob` is a no-op in the open-source
  server; with `honour_migrate` the double re-attaches the jobs to the
  reconnected worker, as a server that implements it would).
- Rooms (`pkg/rtc/room.go`): creation makes the room's dispatches
  (`createAgentDispatchesFromRoomAgent`: none configured -> one for agent
  name "") and launches JT_ROOM jobs (`launchRoomAgents`); a non-agent
  participant joining launches JT_PARTICIPANT jobs (`launchTargetAgents`);
  `AddAgentDispatch` does both for one new dispatch. A launch with no
  worker registered for (agent name, job type) only logs "not dispatching
  agent job since no worker is available" (`pkg/agent/client.go LaunchJob`).
- Twirp: `AgentDispatchService` (`pkg/service/agent_dispatch_service.go`:
  admin grant, the room auto-created, then AddAgentDispatch) and
  `RoomService` basics, with protobuf or JSON bodies; webhooks as
  lk_webhooks.py sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from livekit import api
from livekit.lk_twirp import twirp_handler
from livekit.lk_webhooks import WebhookSender
from livekit.protocol import agent, agent_dispatch, models, room, webhook

log = logging.getLogger("lk_double")

AGENT_NAME_ATTRIBUTE = "lk.agent_name"  # pkg/agent/worker.go AgentNameAttributeKey
KIND_AGENT = models.ParticipantInfo.Kind.AGENT
JT_ROOM, JT_PARTICIPANT = agent.JobType.JT_ROOM, agent.JobType.JT_PARTICIPANT


def guid(prefix: str) -> str:
    return prefix + secrets.token_hex(6)


class NotAvailable(Exception):
    """`ErrWorkerNotAvailable` / `ErrWorkerClosed`: JobRequest tries the next worker."""


@dataclass
class DWorker:
    """`pkg/agent/worker.go Worker`: one registered connection."""

    id: str
    agent_name: str
    namespace: str
    job_type: int
    permissions: models.ParticipantPermission
    ws: web.WebSocketResponse
    status: int = agent.WorkerStatus.WS_AVAILABLE
    load: float = 0.0
    running: dict[str, agent.Job] = field(default_factory=dict)
    availability: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(
        default_factory=dict
    )
    closed: bool = False
    received: list[str] = field(default_factory=list)  # message kinds, in order

    def send(self, msg: agent.ServerMessage) -> None:
        if not self.closed:
            asyncio.get_running_loop().create_task(self._send(msg.SerializeToString()))

    async def _send(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_bytes(data)

    async def write(self, msg: agent.ServerMessage) -> None:
        """`WriteServerMessage`: written before the caller goes on."""
        if self.closed:
            raise NotAvailable("worker closed")
        await self._send(msg.SerializeToString())


@dataclass
class JobRequestResult:
    """What one `JobRequest` came to, as the caller (the room) sees it."""

    job: agent.Job
    outcome: str  # "running", "terminated", "no_worker", "timeout", "error"
    error: str = ""
    elapsed_s: float = 0.0
    worker_id: str = ""
    token: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (worker, answer)
    answer_s: list[float] = field(default_factory=list)  # per attempt, offer -> answer


@dataclass
class DRoom:
    proto: models.Room
    dispatches: dict[str, agent_dispatch.AgentDispatch] = field(default_factory=dict)
    participants: dict[str, models.ParticipantInfo] = field(default_factory=dict)


class LiveKitDouble:
    """See the module docstring. `await start()` returns the http:// URL."""

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        request_timeout_s: float = 3.0,  # psrpc DefaultClientTimeout
        affinity_wait_s: float = 0.2,  # psrpc collects affinity bids this long
        assign_job_timeout_s: float = 10.0,  # pkg/agent/worker.go AssignJobTimeout
        target_load: float = 0.7,  # pkg/agent/config.go DefaultTargetLoad
        honour_migrate: bool = False,
        webhook_url: str = "",
        seed: int = 1,
    ) -> None:
        self.api_key, self.api_secret = api_key, api_secret
        self.request_timeout_s = request_timeout_s
        self.affinity_wait_s = affinity_wait_s
        self.assign_job_timeout_s = assign_job_timeout_s
        self.target_load = target_load
        self.honour_migrate = honour_migrate
        self.rng = random.Random(seed)
        self.workers: dict[str, DWorker] = {}
        self.rooms: dict[str, DRoom] = {}
        self.results: list[JobRequestResult] = []
        self.job_states: dict[str, agent.JobState] = {}  # every job assigned, by id
        self.job_worker: dict[str, DWorker] = {}  # AgentHandler.jobToWorker
        self.not_dispatched: list[tuple[str, int]] = []  # (agent name, job type)
        self.webhooks = WebhookSender(webhook_url, api_key, api_secret) if webhook_url else None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.changed = asyncio.Event()  # set on every job result / status change

    # ------------------------------------------------------------ lifecycle

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/agent", self._agent_ws)
        app.router.add_post("/twirp/livekit.{service}/{method}", twirp_handler(self))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    async def close(self) -> None:
        for w in list(self.workers.values()):
            w.closed = True
            await w.ws.close()
        for t in list(self._tasks):
            t.cancel()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def drop_connections(self) -> None:
        """Close every worker connection, as a restarting server does."""
        for w in list(self.workers.values()):
            await w.ws.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def claims(self, header: str | None) -> api.Claims | None:
        if not header or not header.startswith("Bearer "):
            return None
        try:
            return api.TokenVerifier(self.api_key, self.api_secret).verify(header[7:])
        except Exception:
            return None

    # ------------------------------------------------------------ /agent

    async def _agent_ws(self, request: web.Request) -> web.StreamResponse:
        """`AgentSocketUpgrader.Upgrade` then `AgentHandler.HandleConnection`."""
        claims = self.claims(request.headers.get("Authorization"))
        if claims is None or not claims.video.agent:
            return web.json_response({"msg": "permissions denied"}, status=401)
        ws = web.WebSocketResponse(heartbeat=15)
        await ws.prepare(request)
        try:
            msg = await ws.receive(timeout=10.0)  # RegisterTimeout
        except TimeoutError:
            await ws.close()
            return ws
        if msg.type is not WSMsgType.BINARY:
            return ws
        wm = agent.WorkerMessage.FromString(msg.data)
        if wm.WhichOneof("message") != "register":
            await ws.close()
            return ws
        reg = wm.register
        perms = reg.allowed_permissions if reg.HasField("allowed_permissions") else None
        if perms is None:  # WorkerRegisterer.HandleRegister's default permissions
            perms = models.ParticipantPermission(
                can_subscribe=True,
                can_publish=True,
                can_publish_data=True,
                can_update_metadata=True,
            )
        w = DWorker(guid("AW_"), reg.agent_name, reg.namespace, reg.type, perms, ws)
        w.send(
            agent.ServerMessage(
                register=agent.RegisterWorkerResponse(
                    worker_id=w.id, server_info=models.ServerInfo(version="double", protocol=16)
                )
            )
        )
        self.workers[w.id] = w
        self.changed.set()
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.BINARY:
                    break
                self._signal(w, agent.WorkerMessage.FromString(msg.data))
        finally:
            self._deregister(w)
        return ws

    def _deregister(self, w: DWorker) -> None:
        """`deregisterWorker` + `Worker.Close`: pending offers fail with
        ErrWorkerClosed; running jobs lose their worker (no state change)."""
        w.closed = True
        self.workers.pop(w.id, None)
        for fut in w.availability.values():
            if not fut.done():
                fut.set_exception(NotAvailable("worker closed"))
        for job_id in w.running:
            if self.job_worker.get(job_id) is w:
                del self.job_worker[job_id]
        self.changed.set()

    def _signal(self, w: DWorker, wm: agent.WorkerMessage) -> None:
        """`DispatchWorkerSignal` for a registered worker."""
        which = wm.WhichOneof("message")
        w.received.append(which or "")
        if which == "availability":  # HandleAvailability
            fut = w.availability.pop(wm.availability.job_id, None)
            if fut is not None and not fut.done():
                fut.set_result(wm.availability)
        elif which == "update_job":  # UpdateJobStatus
            u = wm.update_job
            job = w.running.get(u.job_id)
            if job is not None:
                job.state.status = u.status
                job.state.error = u.error
                job.state.updated_at = time.time_ns()
                if u.status in (agent.JobStatus.JS_SUCCESS, agent.JobStatus.JS_FAILED):
                    job.state.ended_at = time.time_ns()
                    del w.running[u.job_id]
                    self.job_worker.pop(u.job_id, None)
        elif which == "update_worker":  # HandleUpdateWorker
            u = wm.update_worker
            if u.HasField("status"):
                w.status = u.status
            w.load = u.load
        elif which == "migrate_job":  # HandleMigrateJob: a no-op in the OSS server
            if self.honour_migrate:
                for job_id in wm.migrate_job.job_ids:
                    state = self.job_states.get(job_id)
                    if state is not None and state.status == agent.JobStatus.JS_RUNNING:
                        for other in self.workers.values():
                            if other is not w:
                                other.running.pop(job_id, None)
                        job = agent.Job(id=job_id, state=state)
                        job.state.worker_id = w.id
                        self.job_states[job_id] = job.state
                        w.running[job_id] = job
                        self.job_worker[job_id] = w
        elif which == "ping":
            w.send(
                agent.ServerMessage(
                    pong=agent.WorkerPong(
                        last_timestamp=wm.ping.timestamp, timestamp=int(time.time() * 1000)
                    )
                )
            )
        self.changed.set()

    # ------------------------------------------------------------ job requests

    def _affinity(self, job: agent.Job) -> float:
        """`JobRequestAffinity`."""
        return sum(
            max(0.0, self.target_load - w.load)
            for w in self.workers.values()
            if w.agent_name == job.agent_name
            and w.namespace == job.namespace
            and w.job_type == job.type
            and w.status == agent.WorkerStatus.WS_AVAILABLE
        )

    def _select(self, job: agent.Job, tried: set[str]) -> DWorker:
        """`selectWorkerWeightedByLoad`."""
        workers = [
            w
            for w in self.workers.values()
            if w.agent_name == job.agent_name
            and w.namespace == job.namespace
            and w.job_type == job.type
        ]
        if not workers:
            raise LookupError("no workers available")
        loads = {
            w.id: max(0.0, 1.0 - w.load)
            for w in workers
            if w.id not in tried and w.status == agent.WorkerStatus.WS_AVAILABLE
        }
        total = sum(loads.values())
        if total == 0:
            raise LookupError("no workers with sufficient capacity")
        pick = self.rng.random() * total
        for w in workers:
            if w.id in loads:
                pick -= loads[w.id]
                if pick <= 0:
                    return w
        return workers[0]

    async def job_request(self, job: agent.Job) -> JobRequestResult:
        """`AgentHandler.JobRequest` under psrpc's client timeout (see module doc)."""
        t0 = time.monotonic()
        res = JobRequestResult(job=job, outcome="error")
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await asyncio.sleep(self.affinity_wait_s)  # bids are collected this long
                if self._affinity(job) <= 0:
                    res.outcome, res.error = "no_worker", "no servers available"
                else:
                    await self._job_request(job, res)
        except TimeoutError:
            res.outcome, res.error = "timeout", "request timed out"
        res.elapsed_s = time.monotonic() - t0
        self.results.append(res)
        self.changed.set()
        return res

    async def _job_request(self, job: agent.Job, res: JobRequestResult) -> None:
        tried: set[str] = set()
        while True:
            try:
                w = self._select(job, tried)
            except LookupError as exc:
                res.outcome, res.error = "no_worker", str(exc)
                return
            tried.add(w.id)
            t = time.monotonic()
            try:
                state, token = await self._assign(w, job)
            except NotAvailable as exc:  # retried on the next worker
                res.attempts.append((w.id, str(exc)))
                res.answer_s.append(time.monotonic() - t)
                continue
            except RuntimeError as exc:  # any other error fails the request
                res.attempts.append((w.id, str(exc)))
                res.outcome, res.error = "error", str(exc)
                return
            res.answer_s.append(time.monotonic() - t)
            res.worker_id = w.id
            if state.status == agent.JobStatus.JS_SUCCESS:
                res.attempts.append((w.id, "terminate"))
                res.outcome = "terminated"
            else:
                res.attempts.append((w.id, "accepted"))
                res.outcome, res.token = "running", token
                self.job_worker[job.id] = w
            return

    async def _assign(self, w: DWorker, job: agent.Job) -> tuple[agent.JobState, str]:
        """`Worker.AssignJob`."""
        job = agent.Job.FromString(job.SerializeToString())
        if job.id in w.availability:
            raise RuntimeError("duplicate job assignment")
        fut: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
        w.availability[job.id] = fut
        now = time.time_ns()
        job.state.worker_id = w.id
        job.state.updated_at = job.state.started_at = now
        job.state.status = agent.JobStatus.JS_RUNNING
        try:
            await w.write(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
            ans = await asyncio.wait_for(fut, self.assign_job_timeout_s)
        except TimeoutError:
            raise RuntimeError("agent worker availability timeout") from None
        finally:
            w.availability.pop(job.id, None)
        if ans.terminate:
            job.state.ended_at = now
            job.state.status = agent.JobStatus.JS_SUCCESS
            self.job_states[job.id] = job.state
            return job.state, ""
        if not ans.available:
            raise NotAvailable("worker not available")
        job.state.participant_identity = ans.participant_identity
        attrs = dict(ans.participant_attributes)
        attrs[AGENT_NAME_ATTRIBUTE] = w.agent_name
        token = self.agent_token(
            job.room.name,
            ans.participant_identity,
            ans.participant_name,
            ans.participant_metadata,
            attrs,
            w.permissions,
        )
        await w.write(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token=token)))
        w.running[job.id] = job
        self.job_states[job.id] = job.state
        return job.state, token

    def agent_token(
        self,
        room_name: str,
        identity: str,
        name: str,
        metadata: str,
        attributes: dict[str, str],
        perms: models.ParticipantPermission,
    ) -> str:
        """`protoagent.BuildAgentToken` (livekit/protocol agent/token.go)."""
        grants = api.VideoGrants(
            room_join=True,
            room=room_name,
            agent=True,
            can_subscribe=perms.can_subscribe,
            can_publish=perms.can_publish,
            can_publish_data=perms.can_publish_data,
            can_update_own_metadata=perms.can_update_metadata,
            hidden=perms.hidden,
        )
        tok = (
            api.AccessToken(self.api_key, self.api_secret)
            .with_identity(identity)
            .with_kind("agent")
            .with_grants(grants)
            .with_attributes(attributes)
            .with_ttl(datetime.timedelta(hours=6))
        )
        if name:
            tok = tok.with_name(name)
        if metadata:
            tok = tok.with_metadata(metadata)
        return tok.to_jwt()

    def terminate_job(self, job_id: str, agent_left: bool = False) -> bool:
        """`AgentHandler.JobTerminate` -> `Worker.TerminateJob`."""
        w = self.job_worker.get(job_id)
        if w is None or job_id not in w.running:
            return False
        w.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job_id)))
        job = w.running.pop(job_id)
        job.state.status = agent.JobStatus.JS_FAILED if agent_left else agent.JobStatus.JS_SUCCESS
        job.state.error = "agent worker left the room" if agent_left else ""
        job.state.ended_at = time.time_ns()
        del self.job_worker[job_id]
        self.changed.set()
        return True

    # ------------------------------------------------------------ rooms

    def _webhook(self, event: str, r: DRoom, p: models.ParticipantInfo | None = None) -> None:
        if self.webhooks is not None:
            ev = webhook.WebhookEvent(event=event, room=r.proto)
            if p is not None:
                ev.participant.CopyFrom(p)
            self.webhooks.notify(ev)

    def _has_worker(self, agent_name: str, job_type: int) -> bool:
        """`agentClient.getDispatcher` (CheckEnabled over registered workers)."""
        return any(
            w.agent_name == agent_name and w.job_type == job_type for w in self.workers.values()
        )

    def _launch(
        self,
        r: DRoom,
        d: agent_dispatch.AgentDispatch,
        job_type: int,
        p: models.ParticipantInfo | None = None,
    ) -> None:
        """`agentClient.LaunchJob` for one dispatch, then `handleNewJobs`."""
        if not self._has_worker(d.agent_name, job_type):
            log.info("not dispatching agent job since no worker is available")
            self.not_dispatched.append((d.agent_name, job_type))
            return
        job = agent.Job(
            id=guid("AJ_"),
            dispatch_id=d.id,
            type=job_type,
            room=r.proto,
            agent_name=d.agent_name,
            metadata=d.metadata,
        )
        if p is not None:
            job.participant.CopyFrom(p)
        job.attributes.update(d.attributes)

        async def run() -> None:
            res = await self.job_request(job)
            if res.outcome in ("running", "terminated"):
                launched = agent.Job.FromString(job.SerializeToString())
                launched.state.CopyFrom(self.job_states.get(job.id, agent.JobState()))
                d.state.jobs.append(launched)

        self._spawn(run())

    def create_room(
        self, name: str, agents: list[agent_dispatch.RoomAgentDispatch] | None = None
    ) -> DRoom:
        """`RoomManager` creating a room: its dispatches from the room's agents
        (`createAgentDispatchesFromRoomAgent`), then `launchRoomAgents`."""
        r = self.rooms.get(name)
        if r is not None:
            return r
        now = time.time()
        r = DRoom(
            models.Room(
                sid=guid("RM_"),
                name=name,
                creation_time=int(now),
                creation_time_ms=int(now * 1000),
                departure_timeout=20,
            )
        )
        self.rooms[name] = r
        self._webhook("room_started", r)
        for rad in agents or [agent_dispatch.RoomAgentDispatch()]:
            d = self._new_dispatch(r, rad.agent_name, rad.metadata, dict(rad.attributes))
            self._launch(r, d, JT_ROOM)
        return r

    def _new_dispatch(
        self, r: DRoom, agent_name: str, metadata: str, attributes: dict[str, str]
    ) -> agent_dispatch.AgentDispatch:
        """`Room.createAgentDispatch`."""
        d = agent_dispatch.AgentDispatch(
            id=guid("AD_"), agent_name=agent_name, room=r.proto.name, metadata=metadata
        )
        d.attributes.update(attributes)
        d.state.created_at = time.time_ns()
        r.dispatches[d.id] = d
        return d

    def add_dispatch(
        self, room_name: str, agent_name: str, metadata: str = "", attributes: Any = None
    ) -> agent_dispatch.AgentDispatch:
        """`Room.AddAgentDispatch` (the room is auto-created first, as
        `AgentDispatchService.CreateDispatch` does)."""
        r = self.create_room(room_name)
        d = self._new_dispatch(r, agent_name, metadata, dict(attributes or {}))
        self._launch(r, d, JT_ROOM)
        for p in r.participants.values():
            if p.kind != KIND_AGENT:
                self._launch(r, d, JT_PARTICIPANT, p)
        return d

    def join(
        self,
        room_name: str,
        identity: str,
        *,
        kind: int = models.ParticipantInfo.Kind.STANDARD,
        attributes: dict[str, str] | None = None,
        room_config: room.RoomConfiguration | None = None,
    ) -> models.ParticipantInfo:
        """A participant joins (`Room.Join`): the room is created on the first
        join with the token's room configuration agents; a non-agent joining
        launches JT_PARTICIPANT jobs for the room's dispatches."""
        r = self.rooms.get(room_name)
        if r is None:
            agents = list(room_config.agents) if room_config is not None else None
            r = self.create_room(room_name, agents or None)
        p = models.ParticipantInfo(
            sid=guid("PA_"),
            identity=identity,
            kind=kind,
            state=models.ParticipantInfo.State.ACTIVE,
            joined_at=int(time.time()),
        )
        p.attributes.update(attributes or {})
        r.participants[identity] = p
        if kind != KIND_AGENT:
            for d in list(r.dispatches.values()):
                self._launch(r, d, JT_PARTICIPANT, p)
        self._webhook("participant_joined", r, p)
        return p

    def leave(self, room_name: str, identity: str) -> None:
        """A participant leaves; an agent leaving ends its job (`TerminateJob`
        with AGENT_LEFT_ROOM)."""
        r = self.rooms[room_name]
        p = r.participants.pop(identity)
        p.state = models.ParticipantInfo.State.DISCONNECTED
        self._webhook("participant_left", r, p)
        if p.kind == KIND_AGENT:
            for job_id, state in self.job_states.items():
                if state.participant_identity == identity:
                    self.terminate_job(job_id, agent_left=True)

    def delete_room(self, room_name: str) -> None:
        """`DeleteRoom`: everyone leaves, then `room_finished`."""
        r = self.rooms.get(room_name)
        if r is None:
            return
        for identity in list(r.participants):
            self.leave(room_name, identity)
        del self.rooms[room_name]
        self._webhook("room_finished", r)
