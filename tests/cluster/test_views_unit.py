"""The merge rules of whole-cluster reads (server/cluster_views.py) in process, on
a ClusterNode over the in-memory coordinator: a pool's entry from its owner's own
answer (highest epoch while views differ), this member's marked owner_unreachable
when the owner did not answer, jobs once each, newest first, peers' refusals
counted from when they were first seen."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support import wait_until

from trunkline.cluster.memory import MemoryCoordinator
from trunkline.runtime.cluster import ClusterNode
from trunkline.server.cluster_views import ClusterViews, PeerAnswer, SnapshotCache, _newest


def entry(pool: str, owner: str, epoch: int, workers: int) -> dict[str, Any]:
    return {"agent_name": pool, "owner": owner, "epoch": epoch, "workers": workers}


async def node_seeing(owner: str, *pools: str) -> ClusterNode:
    """Member "c" whose view shows `owner` holding each of `pools`."""
    store = MemoryCoordinator(time.monotonic)
    for pool in pools:
        assert await store.acquire(pool, owner, 60_000, floor=0) == 1
    await store.heartbeat(owner, {"url": "http://a.invalid"}, 60_000)
    node = ClusterNode(
        store, [], url="http://c.invalid", lease_ttl_s=1.0, clock=time.monotonic, member="c"
    )
    await node.tick()
    await wait_until(lambda: all(node.lease_of(p) for p in pools), 5.0, what="the view read")
    return node


async def test_a_pool_entry_comes_from_its_owner_or_is_marked_unreachable() -> None:
    """Owner a's own entry wins over this member's and over b's stale claim at a lower
    epoch; a pool only a peer has is added; with a silent, this member's entry is kept
    and marked owner_unreachable; an entry a member gives for another's pool is ignored."""
    node = await node_seeing("a", "support", "sales")
    views = ClusterViews(node, lambda: None)
    local = [{"agent_name": "support", "workers": 0}, {"agent_name": "sales", "workers": 0}]
    views.annotate_pools(local)
    assert [(e["owner"], e["epoch"]) for e in local] == [("a", 1), ("a", 1)]
    a = PeerAnswer(
        "a",
        "http://a.invalid",
        200,
        {
            "pools": [
                entry("support", "a", 3, 2),
                entry("sales", "a", 3, 1),
                entry("new", "a", 1, 4),
            ]
        },
    )
    b = PeerAnswer("b", "http://b.invalid", 200, {"pools": [entry("support", "b", 2, 9)]})
    merged = views.merge_pools(local, [b, a], set())
    assert [(e["agent_name"], e["owner"], e["workers"]) for e in merged] == [
        ("support", "a", 2),
        ("sales", "a", 1),
        ("new", "a", 4),
    ]
    assert not any(e["owner_unreachable"] for e in merged)
    silent = PeerAnswer("a", "http://a.invalid", None, error="ClientConnectorError")
    lying = PeerAnswer("b", "http://b.invalid", 200, {"pools": [entry("sales", "a", 9, 7)]})
    merged = views.merge_pools(local, [silent, lying], {"a"})
    assert [(e["agent_name"], e["workers"], e["owner_unreachable"]) for e in merged] == [
        ("support", 0, True),
        ("sales", 0, True),
    ]
    await node.close()


def test_jobs_are_listed_once_live_first_then_ended_newest_first() -> None:
    """A job two members report (a carried-over copy) is listed once; live ones by
    creation, newest first, then ended ones by end, newest first; each list capped."""
    jobs = [
        {"job_id": "j1", "created_at": 1.0, "ended_at": 9.0},
        {"job_id": "j2", "created_at": 2.0, "ended_at": None},
        {"job_id": "j3", "created_at": 3.0, "ended_at": 5.0},
        {"job_id": "j2", "created_at": 2.0, "ended_at": None},
        {"job_id": "j4", "created_at": 4.0, "ended_at": None},
    ]
    assert [j["job_id"] for j in _newest(jobs)] == ["j4", "j2", "j1", "j3"]
    assert [j["job_id"] for j in _newest(jobs, live=1, ended=1)] == ["j4", "j1"]


async def test_peers_refusals_count_from_when_first_seen() -> None:
    """A member seen with 5 refusals adds none at once (they are in its own history),
    then each new one; its running, queued and replicas add to this member's now."""

    class Hub:
        viewers: set[object] = set()

    node = await node_seeing("a", "support")
    cache = SnapshotCache(ClusterViews(node, lambda: None), Hub(), lambda: "t")  # type: ignore[arg-type]
    local = {"running": 1, "queued": 0, "replicas": 1, "refused_total": 2}

    def seen(refused: int) -> None:
        body = {
            "snapshot": {},
            "totals_now": {"running": 3, "queued": 2, "replicas": 2, "refused_total": refused},
        }
        cache.answers["a"] = (time.monotonic(), PeerAnswer("a", "http://a.invalid", 200, body))

    seen(5)
    assert cache.totals(local) == {"running": 4, "queued": 2, "replicas": 3, "refused_total": 2}
    seen(8)
    assert cache.totals(local)["refused_total"] == 5
    cache.answers.clear()  # not fetched lately: this member alone
    assert cache.totals(local) == {**local, "refused_total": 5}
    await node.close()


def test_status_names_each_pools_owner_and_an_unreachable_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`trunkline status` on a merged pool list names each pool's owner, and says
    when the owner did not answer (the numbers shown are then the member's own)."""
    from trunkline.cli.status import render

    pools = [
        {"agent_name": "support", "queued": 1, "owner": "s0", "owner_unreachable": False},
        {"agent_name": "sales", "queued": 0, "owner": "s1", "owner_unreachable": True},
    ]
    render("http://x", pools, [])
    lines = capsys.readouterr().out.splitlines()
    support = next(x for x in lines if "pool support" in x)
    sales = next(x for x in lines if "pool sales" in x)
    assert "owner s0" in support
    assert "unreachable" not in support
    assert "owner s1 (unreachable" in sales
