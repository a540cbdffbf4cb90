"""The owner's half of SIP in cluster mode (runtime/sip_hub.SipCallHub) on a
real Dispatcher in process: who may join a call's job, what each joining edge
hears, and when the hub ends a job itself."""

from __future__ import annotations

import asyncio

from support import wait_until

from trunkline.cluster import MemoryCoordinator
from trunkline.config import parse_config
from trunkline.core import AcceptInfo
from trunkline.runtime.cluster import ClusterNode
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.sip_cluster import ClusterAdmission, call_key
from trunkline.runtime.sip_hub import SipCallHub
from trunkline.stores import JobRecord

POOL = "support"
META = {
    "sip.call_id": "c1@x",
    "sip.from": "<sip:alice@10.0.0.1>;tag=ft1",
    "sip.to": "<sip:+15550100@10.0.0.5>",
    "sip.called": "+15550100",
    "sip.cseq": "1",
    "sip.trunk": "t",
}


class _Link:
    """A worker connection that drops what it is sent."""

    def send(self, frame: bytes) -> None:
        pass

    async def close(self, message: bytes) -> None:
        pass


class Edge:
    """An EdgeLink recording what the hub told it."""

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.events: list[tuple[str, str]] = []

    def joined(self) -> None:
        self.events.append(("joined", ""))

    def placed(self, job_id: str, worker_id: str) -> None:
        self.events.append(("placed", job_id))

    def refused(self, reason: str) -> None:
        self.events.append(("refused", reason))

    def ended(self) -> None:
        self.events.append(("ended", ""))

    def unknown(self) -> None:
        self.events.append(("unknown", ""))

    def close(self) -> None:
        self.events.append(("closed", ""))


def _dispatcher() -> Dispatcher:
    config = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {POOL: {"max_jobs_per_worker": 1, "queue_max_wait_s": 60}},
        }
    )
    d = Dispatcher(config, Metrics())
    d.start(asyncio.get_running_loop())
    return d


async def _join(
    hub: SipCallHub, edge: Edge, job_id: str = "AJ_1", *, create: bool = True, **meta: str
) -> None:
    await hub.join(
        job_id,
        POOL,
        max_wait_s=30.0,
        room=f"sip-{edge.edge_id}",
        metadata={**META, **meta},
        create=create,
        link=edge,
    )


def _place(d: Dispatcher, job_id: str = "AJ_1", worker: str = "AW_1") -> None:
    d.worker_connected(_Link(), worker, POOL, 1)
    d.offer_answered(
        worker, job_id, available=True, terminate=False, accept=AcceptInfo("a", "a", "", {})
    )


def test_call_key_is_call_id_from_tag_and_cseq() -> None:
    """The key a proxy failing over keeps: Call-ID, From tag and CSeq, not the Via."""
    assert call_key(META) == "sip:c1@x|ft1|1"
    assert call_key({**META, "sip.from": "<sip:alice@10.0.0.1>;tag=ft2"}) != call_key(META)
    assert call_key({**META, "sip.cseq": "2"}) != call_key(META)


async def test_edge_that_created_the_job_hears_placed_once_then_ended() -> None:
    """The creating edge hears joined, placed once (with the job id), and ended."""
    d = _dispatcher()
    hub = SipCallHub(d)
    edge = Edge("s1/call-1")
    await _join(hub, edge)
    assert edge.events == [("joined", "")]
    _place(d)
    assert edge.events[1:] == [("placed", "AJ_1")]
    d.cancel("AJ_1", "test ends it")
    d.worker_disconnected("AW_1", "gone")
    await wait_until(lambda: ("ended", "") in edge.events, 5.0, what="ended")
    assert edge.events.count(("placed", "AJ_1")) == 1


async def test_a_second_edge_never_takes_a_call_from_a_live_one() -> None:
    """While the first edge's link is up, another edge joining is refused and the
    first keeps the call; once it is lost, the other edge is attached."""
    d = _dispatcher()
    hub = SipCallHub(d)
    first, second = Edge("s1/a"), Edge("s2/b")
    await _join(hub, first)
    await _join(hub, second, create=False)
    assert second.events == [("refused", "the call is in progress at another cluster member")]
    hub.link_lost("AJ_1", first)
    third = Edge("s2/c")
    await _join(hub, third, create=False)
    _place(d)
    assert third.events == [("joined", ""), ("placed", "AJ_1")]
    assert ("placed", "AJ_1") not in first.events


async def test_a_join_on_another_trunk_is_refused() -> None:
    """An INVITE admitted on another trunk cannot join the call's job."""
    d = _dispatcher()
    hub = SipCallHub(d)
    first = Edge("s1/a")
    await _join(hub, first)
    hub.link_lost("AJ_1", first)
    other = Edge("s2/b")
    await _join(hub, other, create=False, **{"sip.trunk": "elsewhere"})
    assert other.events == [("refused", "the call's job belongs to another trunk")]


async def test_losing_a_placed_calls_edge_ends_its_job_once_and_a_late_join_is_refused() -> None:
    """An edge lost after it heard placed: the job is cancelled (sip_edge_lost);
    an edge joining afterwards hears the job's end, no new job is made."""
    d = _dispatcher()
    hub = SipCallHub(d)
    edge = Edge("s1/a")
    await _join(hub, edge)
    _place(d)
    hub.link_lost("AJ_1", edge)
    job = d.live_job("AJ_1")
    assert job is not None  # terminating: the worker still has to confirm
    d.worker_disconnected("AW_1", "gone")
    assert hub.edges_lost == 1

    async def ended() -> bool:
        return d.live_job("AJ_1") is None and await d.find_job("AJ_1") is not None

    await wait_until(ended, 5.0, what="the job ended")
    late = Edge("s2/b")
    await _join(hub, late, create=True)  # even with create: the id is taken
    assert late.events[0][0] == "refused"
    assert "ended after placement" in late.events[0][1]
    assert d.live_job("AJ_1") is None


async def test_a_job_placed_with_no_edge_waits_for_one_then_is_cancelled() -> None:
    """Its edge lost while queued, the job placed with none attached: held for
    reattach_s, then cancelled; an unknown id is answered unknown."""
    d = _dispatcher()
    hub = SipCallHub(d, reattach_s=0.05)
    edge = Edge("s1/a")
    await _join(hub, edge)
    hub.link_lost("AJ_1", edge)
    _place(d)
    assert ("placed", "AJ_1") not in edge.events
    await wait_until(lambda: hub.unclaimed_cancelled == 1, 5.0, what="cancelled unclaimed")
    nobody = Edge("s2/b")
    await _join(hub, nobody, "AJ_unknown", create=False)
    assert nobody.events == [("unknown", "")]


async def test_unreadable_sip_fields_still_make_a_job() -> None:
    """A member's join whose SIP fields do not parse still gets its job (no record
    of the call's numbers) rather than an error."""
    d = _dispatcher()
    hub = SipCallHub(d)
    edge = Edge("s1/a")
    await _join(hub, edge, **{"sip.to": "not a uri", "sip.called": ""})
    assert edge.events == [("joined", "")]
    assert d.live_job("AJ_1") is not None


async def test_only_the_attached_edge_may_end_the_job() -> None:
    """control() from an edge that does not hold the call does nothing."""
    d = _dispatcher()
    hub = SipCallHub(d)
    edge = Edge("s1/a")
    await _join(hub, edge)
    assert hub.control("cancel", "AJ_1", "s2/other", "bye") is False
    assert d.live_job("AJ_1") is not None
    assert hub.control("cancel", "AJ_1", "s1/a", "caller hung up") is True
    assert d.live_job("AJ_1") is None
    assert edge.events[-1] == ("closed", "")


class EdgeRecorder:
    """The SipServer side of ClusterAdmission: records the answers and, like the
    edge, reports the final it sends for a refusal."""

    def __init__(self) -> None:
        self.admission: ClusterAdmission | None = None
        self.events: list[tuple[str, str]] = []

    def on_placed(self, call_ref: str, job_id: str, worker_id: str) -> None:
        self.events.append(("placed", job_id))

    def on_refused(self, call_ref: str, reason: str) -> None:
        self.events.append(("refused", reason))
        assert self.admission is not None
        self.admission.final_sent(call_ref, 503)

    def on_job_ended(self, job_id: str) -> None:
        self.events.append(("ended", job_id))


async def _member(
    d: Dispatcher,
) -> tuple[ClusterAdmission, ClusterNode, EdgeRecorder, MemoryCoordinator]:
    loop = asyncio.get_running_loop()
    store = MemoryCoordinator(loop.time)
    node = ClusterNode(
        store, [POOL], url="http://m1", lease_ttl_s=2.0, clock=loop.time, member="m1"
    )
    admission = ClusterAdmission(d, "k", "s" * 32)
    admission.bind(node, store)
    edge = EdgeRecorder()
    edge.admission = admission
    admission.edge = edge
    node.start()
    await admission.start()
    await wait_until(lambda: node.may_act(POOL), 5.0, what="the member owns the pool")
    return admission, node, edge, store


async def test_at_the_owner_a_call_is_claimed_then_placed_and_a_second_invite_joins() -> None:
    """At the pool's owner (no HTTP): the INVITE's key is claimed and its job placed;
    the same INVITE again (same Call-ID, tag, CSeq) joins that job, no second one."""
    d = _dispatcher()
    admission, node, edge, _ = await _member(d)
    try:
        admission.request("ref-1", POOL, 5.0, META)
        await wait_until(lambda: len(list(d.live_jobs())) == 1, 5.0, what="the job requested")
        (job,) = d.live_jobs()
        _place(d, job.id)
        assert edge.events == [("placed", job.id)]
        admission.request("ref-2", POOL, 5.0, META)  # a proxy's failover, say
        await wait_until(lambda: admission.joined_elsewhere == 1, 5.0, what="claimed already")
        await wait_until(lambda: len(edge.events) == 2, 5.0, what="the second INVITE answered")
        assert edge.events[1] == ("refused", "the call is in progress at another cluster member")
        assert [j.id for j in d.live_jobs()] == [job.id]
        admission.release("ref-1", "caller_bye")
        rec = await d.find_job(job.id)
        assert rec is not None
        assert rec.reason == "SIP call ended: caller_bye"
    finally:
        await admission.aclose()
        await node.close()


async def test_at_the_owner_a_refused_call_records_the_final_it_got() -> None:
    """A call the scheduler refuses at once (no worker, no queue) gets the trunk's
    refusal, and the job's record keeps the final the edge sent (503)."""
    config = parse_config(
        {
            "keys": {"k": "s" * 32},
            "pools": {POOL: {"max_jobs_per_worker": 1, "queue_max_wait_s": 0}},
        }
    )
    d = Dispatcher(config, Metrics())
    d.start(asyncio.get_running_loop())
    admission, node, edge, store = await _member(d)
    try:
        admission.request("ref-1", POOL, 0.0, META)
        await wait_until(lambda: len(edge.events) == 1, 5.0, what="the call refused")
        assert edge.events[0][0] == "refused", edge.events

        job_id = await store.claim(call_key(META), "unused", 1000)  # the id bound first

        async def recorded() -> JobRecord | None:
            return await d.find_job(job_id)

        rec = await wait_until(recorded, 5.0, what="the job's record")
        assert rec.sip is not None
        assert rec.sip.final_status == 503
    finally:
        await admission.aclose()
        await node.close()
