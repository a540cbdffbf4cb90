"""The SIP edge in cluster mode: three real members on a real redis-server,
each with its own SIP port; calls at a member that does not own the pool are
admitted by the owner, and a call whose edge member dies is answered from its
job by the member the INVITE is sent to again."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster.redisserver import RedisServer
from cluster.servers import POOL, cluster_toml, owner_of, signal_server
from prometheus_client.parser import text_string_to_metric_families
from protoworker import ProtoWorker
from sip.sipkit import UdpEndpoint, answer, invite, request_like
from sip.test_sipp import SIPP, free_udp_port, sipp_burst, stat_column
from support import ServerProcess, wait_until

from trunkline.cluster import create_coordinator
from trunkline.sip.message import SipRequest, SipResponse


def sip_toml(port: int, downstream_port: int, max_wait_s: float) -> str:
    return (
        f'[sip]\nhost = "127.0.0.1"\nport = {port}\ntcp = false\n'
        f'[sip.trunks.main]\nnumbers = ["+1555*"]\npool = "{POOL}"\n'
        f'max_wait_s = {max_wait_s}\ndownstream = "127.0.0.1:{downstream_port}"\n'
        "retry_after_s = 3\n"
    )


@pytest.fixture
async def sip_cluster(
    tmp_path: Path, redis: RedisServer
) -> AsyncIterator[Callable[[int, float], list[tuple[ServerProcess, int]]]]:
    """Starts three members, each with a SIP edge on a port of its own
    (returned with each server), all with one trunk to the given downstream."""
    started: list[ServerProcess] = []

    def make(downstream_port: int, max_wait_s: float) -> list[tuple[ServerProcess, int]]:
        out: list[tuple[ServerProcess, int]] = []
        for i in range(3):
            d = tmp_path / f"s{i}"
            d.mkdir()
            while True:
                # Free ports are picked before any member binds: never the same twice.
                port = free_udp_port()
                extra = sip_toml(port, downstream_port, max_wait_s)
                srv = ServerProcess(d, cluster_toml(redis.url, f"s{i}", extra))
                taken = {p for _, p in out} | {s.port for s, _ in out}
                if port not in taken and srv.port not in taken:
                    break
            out.append((srv, port))
            started.append(srv)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda sp: sp[0].start(timeout=60.0), out))
        return out

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


async def jobs_at(owner: ServerProcess) -> list[dict[str, Any]]:
    data = await owner.get(f"/v1/jobs?agent_name={POOL}&limit=100")
    jobs: list[dict[str, Any]] = data["jobs"]
    return jobs


@pytest.mark.sipp
@pytest.mark.skipif(SIPP is None, reason="sipp not installed (Debian package sip-tester)")
async def test_sip_calls_at_a_non_owner_are_admitted_by_the_owner_with_the_cap_exact(
    tmp_path: Path, sip_cluster: Callable[[int, float], list[tuple[ServerProcess, int]]]
) -> None:
    """6 INVITEs at a member that does not own the pool, two cap-2 workers: 4 answered
    through the downstream, 2 refused 503 within max_wait; 6 jobs at the owner, each
    placed job offered once, never more than 2 on a worker."""
    uas_port, max_wait = free_udp_port(), 0.5
    members = sip_cluster(uas_port, max_wait)
    servers = [srv for srv, _ in members]
    owner, _ = await owner_of(servers)
    edge_srv, edge_port = next((s, p) for s, p in members if s is not owner)
    other = next(s for s in servers if s not in (owner, edge_srv))
    workers = [ProtoWorker.autonomous(srv.url, POOL, max_jobs=2) for srv in (owner, other)]
    for w in workers:
        await w.connect()
    try:
        (uac_rc, uac_out), (uas_rc, uas_out) = await sipp_burst(
            edge_port, uas_port, tmp_path, calls=6, answers=4
        )
        assert uac_rc == 0, uac_out[-3000:]
        assert uas_rc == 0, uas_out[-3000:]
        assert stat_column(tmp_path, "uac_burst", "SuccessfulCall(C)") == 6
        assert stat_column(tmp_path, "uac_burst", "FailedCall(C)") == 0

        async def all_ended() -> list[dict[str, Any]] | None:
            jobs = await jobs_at(owner)
            return jobs if len(jobs) == 6 and all(j["ended"] for j in jobs) else None

        jobs = await wait_until(all_ended, 30, what="6 call jobs end at the owner")
        refused = [j for j in jobs if j["state"] == "no_capacity"]
        placed = [j for j in jobs if j["state"] != "no_capacity"]
        assert len(refused) == 2, [(j["state"], j["reason"]) for j in jobs]
        assert all(j["queue_wait_s"] <= max_wait + 0.1 for j in refused)
        assert [j["state"] for j in placed] == ["cancelled"] * 4  # the caller hung up
        offered = sorted(job for w in workers for job in w.offers)
        assert offered == sorted(j["job_id"] for j in placed)  # each once, to one worker
        assert sorted(len(w.assigned) for w in workers) == [2, 2]  # the cap, 2 each
        assert all(w.terminated for w in workers)
        # No member other than the owner holds a job of its own.
        for srv in servers:
            if srv is not owner:
                assert await jobs_at(srv) == []
    finally:
        for w in workers:
            await w.close()


async def cluster_events(srv: ServerProcess) -> dict[str, float]:
    """`trunkline_sip_cluster_events_total` of `srv`, by event."""
    async with aiohttp.ClientSession() as session, session.get(srv.url + "/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["event"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "trunkline_sip_cluster_events_total"
    }


async def edge_lost_seen(owner: ServerProcess) -> None:
    """Wait until the owner has seen one edge's link break."""

    async def seen() -> bool:
        return (await cluster_events(owner)).get("links_lost") == 1

    await wait_until(seen, 10, what="the owner sees the dead edge's link break")


async def _response(
    ep: UdpEndpoint, status: int, within: float = 10.0, call_id: str = ""
) -> SipResponse:
    def wanted(m: SipRequest | SipResponse) -> bool:
        return (
            isinstance(m, SipResponse)
            and m.status == status
            and (not call_id or m.headers.get("Call-ID") == call_id)
        )

    msg = await ep.recv_where(wanted, within)
    assert isinstance(msg, SipResponse)
    return msg


async def test_invite_sent_again_to_a_survivor_after_kill_9_of_its_edge_member_gets_the_job(
    sip_cluster: Callable[[int, float], list[tuple[ServerProcess, int]]],
) -> None:
    """An INVITE queued at the owner through member R; R killed -9 before any final;
    the same INVITE bytes sent to member S (a proxy failing over): S joins that job (no
    second one), forwards the INVITE once a worker takes it, relays the 200, and the
    job ends once when the caller hangs up."""
    caller, uas = await UdpEndpoint.open(), await UdpEndpoint.open()
    members = sip_cluster(uas.port, 20.0)
    servers = [srv for srv, _ in members]
    owner, _ = await owner_of(servers)
    (r_srv, r_port), (s_srv, s_port) = [(s, p) for s, p in members if s is not owner]
    call_id = "failover-1@127.0.0.1"
    data = invite(call_id=call_id, host="127.0.0.1", port=caller.port, branch="z9hG4bKfo1")
    worker = ProtoWorker.autonomous(owner.url, POOL, max_jobs=1)
    try:
        caller.send(data, r_port)
        await _response(caller, 100)

        async def queued() -> str | None:
            jobs = await jobs_at(owner)
            return jobs[0]["job_id"] if len(jobs) == 1 and jobs[0]["state"] == "queued" else None

        job_id = await wait_until(queued, 10, what="the call's job queued at the owner")
        signal_server(r_srv, signal.SIGKILL)
        assert r_srv.proc is not None
        r_srv.proc.wait(10)
        await edge_lost_seen(owner)
        caller.send(data, s_port)  # the INVITE again, the same bytes, at a survivor
        await _response(caller, 100)
        await worker.connect()
        fwd = await uas.recv_where(lambda m: isinstance(m, SipRequest), 15.0)
        assert isinstance(fwd, SipRequest)
        assert fwd.method == "INVITE"
        assert fwd.headers.get("X-Trunkline-Job") == job_id  # the same job, not a new one
        assert fwd.headers.get("Call-ID") == call_id
        uas.send(answer(fwd, 200, "OK"), s_port)
        ok = await _response(caller, 200)
        assert ok.headers.get("Call-ID") == call_id
        assert worker.assigned == [job_id]
        bye = request_like(
            "BYE", call_id=call_id, to_tag="gw1", cseq=2, host="127.0.0.1", port=caller.port,
            branch="z9hG4bKfo1bye",
        )  # fmt: skip
        caller.send(bye, s_port)
        got = await uas.recv_where(lambda m: isinstance(m, SipRequest) and m.method == "BYE")
        assert isinstance(got, SipRequest)
        uas.send(answer(got, 200, "OK"), s_port)
        await _response(caller, 200)

        async def ended() -> list[dict[str, Any]] | None:
            jobs = await jobs_at(owner)
            return jobs if jobs and all(j["ended"] for j in jobs) else None

        jobs = await wait_until(ended, 15, what="the call's job ends")
        assert [(j["job_id"], j["state"]) for j in jobs] == [(job_id, "cancelled")]
        full = await owner.get(f"/v1/jobs/{job_id}")
        events = [ev["event"] for ev in full["trace"]]
        assert events.count("sip_call_ended") == 1
        assert full["sip"]["call_id"] == call_id
        assert full["sip"]["final_status"] == 200  # the survivor's relayed 200, recorded
        assert worker.offers == [job_id]
        assert await jobs_at(s_srv) == []
        assert (await cluster_events(s_srv))["joined"] == 1
    finally:
        await worker.close()
        caller.close()
        uas.close()


async def test_a_placed_call_whose_edge_member_dies_ends_once_and_a_survivor_refuses_it(
    sip_cluster: Callable[[int, float], list[tuple[ServerProcess, int]]],
) -> None:
    """A call forwarded downstream by member R, R killed -9 before the downstream
    answered: the owner ends the job at once (sip_edge_lost: the call's proxy is gone),
    and the INVITE sent again to S gets the trunk's refusal, 503 with Retry-After,
    without a second job."""
    caller, uas = await UdpEndpoint.open(), await UdpEndpoint.open()
    members = sip_cluster(uas.port, 5.0)
    servers = [srv for srv, _ in members]
    owner, _ = await owner_of(servers)
    (r_srv, r_port), (_s_srv, s_port) = [(s, p) for s, p in members if s is not owner]
    worker = ProtoWorker.autonomous(owner.url, POOL, max_jobs=1)
    await worker.connect()
    call_id = "failover-2@127.0.0.1"
    data = invite(call_id=call_id, host="127.0.0.1", port=caller.port, branch="z9hG4bKfo2")
    try:
        caller.send(data, r_port)
        fwd = await uas.recv_where(lambda m: isinstance(m, SipRequest), 15.0)
        assert isinstance(fwd, SipRequest)
        assert fwd.method == "INVITE"
        job_id = fwd.headers.get("X-Trunkline-Job")
        signal_server(r_srv, signal.SIGKILL)
        assert r_srv.proc is not None
        r_srv.proc.wait(10)

        async def ended() -> dict[str, Any] | None:
            job: dict[str, Any] = await owner.get(f"/v1/jobs/{job_id}")
            return job if job["ended"] else None

        job = await wait_until(ended, 15, what="the job of the dead edge's call ends")
        assert job["state"] == "cancelled"
        assert "edge member is gone" in job["reason"]
        caller.send(data, s_port)
        refusal = await _response(caller, 503)
        assert refusal.headers.get("Retry-After") == "3"
        assert "ended after placement" in (refusal.headers.get("Reason") or "")
        assert [j["job_id"] for j in await jobs_at(owner)] == [job_id]
        assert worker.offers == [job_id]
    finally:
        await worker.close()
        caller.close()
        uas.close()


async def test_a_queued_call_at_a_non_owner_is_placed_by_the_next_owner_after_kill_9(
    sip_cluster: Callable[[int, float], list[tuple[ServerProcess, int]]], redis: RedisServer
) -> None:
    """An INVITE at member R queued at the owner; the owner killed -9 once the job is
    recorded: R joins the same job at the next owner, forwards the INVITE once a
    worker there takes it, relays the 200, and the job ends once at the BYE."""
    caller, uas = await UdpEndpoint.open(), await UdpEndpoint.open()
    members = sip_cluster(uas.port, 20.0)
    servers = [srv for srv, _ in members]
    owner, epoch = await owner_of(servers)
    (r_srv, r_port), (s_srv, _) = [(s, p) for s, p in members if s is not owner]
    call_id = "owner-dies-1@127.0.0.1"
    data = invite(call_id=call_id, host="127.0.0.1", port=caller.port, branch="z9hG4bKod1")
    store = create_coordinator(redis.url, namespace="t", timeout_s=2.0)
    worker: ProtoWorker | None = None
    try:
        caller.send(data, r_port)
        await _response(caller, 100)

        async def recorded() -> list[str] | None:
            ids = list(await store.records(POOL))
            return ids if len(ids) == 1 else None

        (job_id,) = await wait_until(recorded, 10, what="the call's job recorded in Redis")
        signal_server(owner, signal.SIGKILL)
        assert owner.proc is not None
        owner.proc.wait(10)
        survivors = [r_srv, s_srv]
        new_owner, _ = await owner_of(survivors, above=epoch, within=20)
        worker = ProtoWorker.autonomous(new_owner.url, POOL, max_jobs=1)
        await worker.connect()
        fwd = await uas.recv_where(lambda m: isinstance(m, SipRequest), 20.0)
        assert isinstance(fwd, SipRequest)
        assert fwd.headers.get("X-Trunkline-Job") == job_id
        uas.send(answer(fwd, 200, "OK"), r_port)
        await _response(caller, 200)
        bye = request_like(
            "BYE", call_id=call_id, to_tag="gw1", cseq=2, host="127.0.0.1", port=caller.port,
            branch="z9hG4bKod1bye",
        )  # fmt: skip
        caller.send(bye, r_port)
        got = await uas.recv_where(lambda m: isinstance(m, SipRequest) and m.method == "BYE")
        assert isinstance(got, SipRequest)
        uas.send(answer(got, 200, "OK"), r_port)
        await _response(caller, 200)

        async def ended() -> dict[str, Any] | None:
            job: dict[str, Any] = await new_owner.get(f"/v1/jobs/{job_id}")
            return job if job["ended"] else None

        job = await wait_until(ended, 15, what="the call's job ends at the new owner")
        assert job["state"] == "cancelled"
        assert "caller_bye" in job["reason"]
        assert worker.offers == [job_id]
    finally:
        if worker is not None:
            await worker.close()
        await store.close()
        caller.close()
        uas.close()


async def test_with_redis_unreachable_an_invite_is_refused_503_at_once_not_at_max_wait(
    sip_cluster: Callable[[int, float], list[tuple[ServerProcess, int]]], redis: RedisServer
) -> None:
    """Redis paused: an INVITE at any member gets 503 with Retry-After and a Reason
    naming cluster_unavailable once the claim times out, long before the trunk's
    20 s max wait, and no job is made; with Redis back, calls are placed again."""
    caller, uas = await UdpEndpoint.open(), await UdpEndpoint.open()
    members = sip_cluster(uas.port, 20.0)
    servers = [srv for srv, _ in members]
    owner, _ = await owner_of(servers)
    worker = ProtoWorker.autonomous(owner.url, POOL, max_jobs=1)
    await worker.connect()
    try:
        redis.pause()
        try:
            for i, (_, port) in enumerate(members):
                data = invite(
                    call_id=f"redis-away-{i}@127.0.0.1", host="127.0.0.1", port=caller.port,
                    branch=f"z9hG4bKra{i}",
                )  # fmt: skip
                caller.send(data, port)
                refusal = await _response(caller, 503, 8.0, f"redis-away-{i}@127.0.0.1")
                assert refusal.headers.get("Retry-After") == "3"
                assert "cluster_unavailable" in (refusal.headers.get("Reason") or "")
            assert worker.offers == []
        finally:
            redis.resume()
        new_owner, _ = await owner_of(servers, within=15)  # the same or another
        new_worker = ProtoWorker.autonomous(new_owner.url, POOL, max_jobs=1)
        await new_worker.connect()
        try:
            data = invite(
                call_id="redis-back@127.0.0.1", host="127.0.0.1", port=caller.port,
                branch="z9hG4bKrb",
            )  # fmt: skip
            caller.send(data, members[0][1])
            fwd = await uas.recv_where(lambda m: isinstance(m, SipRequest), 15.0)
            assert isinstance(fwd, SipRequest)
            assert fwd.headers.get("Call-ID") == "redis-back@127.0.0.1"
        finally:
            await new_worker.close()
    finally:
        await worker.close()
        caller.close()
        uas.close()
