"""Cluster mode for the SIP edge, the owner's half: a pool's SIP jobs and the
edge attached to each (docs/cluster.md, "SIP calls"; the edge's half is
`runtime/sip_cluster.py`).

Theory of operation
-------------------
`SipCallHub` runs on every member and acts for the pools it owns. Each SIP
job it knows has at most one edge (an `EdgeLink`: the member and call that
hold the call's dialog). Joining:

* an unknown id with `create`: the job is requested (that id), the joining
  edge attached;
* a live job whose edge is gone (or that has none yet: carried over from a
  dead owner): the edge is attached; the same edge joining again replaces
  its broken link; a live edge is never replaced (Call-ID, tags and CSeq
  travel in clear text: a third party must not take a call) and the joiner
  hears `refused`; a job placed at an old owner (adopted from a migrating
  worker) is joined only by the edge its metadata names (`sip.edge`);
* a job admitted on another trunk: `refused`;
* an ended job: `refused` with its reason; an id not known here: `unknown`
  (a new owner knows carried-over jobs only after its settle time).

A job placed with an edge attached tells it `placed` once (it forwards the
INVITE); placed with none (its edge died while it was queued) it is held
unclaimed for `reattach_s`, then cancelled. An edge's link lost after it was
told `placed` cancels the job at once (`sip_edge_lost`): the call's proxy
died with that member. Lost before: the job stays queued for an edge to join.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

from trunkline.core import Job, JobState
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.sip_admission import sip_call
from trunkline.sip.message import SipParseError
from trunkline.stores import JobRecord, SipCallRecord

log = logging.getLogger("trunkline.sip")

__all__ = ["REATTACH_S", "EdgeLink", "SipCallHub", "ended_reason"]

# An unclaimed placed job (its edge died while it was queued) waits this long
# for the INVITE to come again at another member before it is cancelled.
REATTACH_S = 8.0
_ENDED_KEPT = 10_000


class EdgeLink(Protocol):
    """The owner's line to one call's edge; `edge_id` names member and call."""

    @property
    def edge_id(self) -> str: ...

    def joined(self) -> None: ...

    def placed(self, job_id: str, worker_id: str) -> None: ...

    def refused(self, reason: str) -> None: ...

    def ended(self) -> None: ...

    def unknown(self) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(slots=True)
class _HubCall:
    job_id: str
    link: EdgeLink | None
    told: bool = False
    unclaimed: asyncio.TimerHandle | None = None


def _job_metadata(job: Job) -> dict[str, str]:
    """The SIP fields a job was requested with (its metadata is their JSON)."""
    try:
        got = json.loads(job.metadata)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in got.items()} if isinstance(got, dict) else {}


def _sip_record(metadata: Mapping[str, str]) -> SipCallRecord | None:
    """The call's identity for its job's record (None if a field is unreadable:
    the metadata came from another member over HTTP)."""
    try:
        return sip_call(metadata)
    except SipParseError:
        return None


def _is_sip_job(job: Job) -> bool:
    return job.room.startswith("sip-") and '"sip.call_id"' in job.metadata


def ended_reason(rec: JobRecord) -> str:
    """What a survivor names when it answers a call whose job ended."""
    if rec.placed_at is not None:
        return f"the call's job ended after placement ({rec.state}: {rec.reason})"
    return rec.reason if rec.state != JobState.CANCELLED.value else "cancelled"


class SipCallHub:
    """The owner's half; see the module docstring. A `JobObserver`."""

    def __init__(self, dispatcher: Dispatcher, *, reattach_s: float = REATTACH_S) -> None:
        self._d = dispatcher
        self.reattach_s = reattach_s
        self._calls: dict[str, _HubCall] = {}
        # SIP jobs that ended here, newest last: a join retried with `create`
        # after its job ended must not make it again.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.links_lost = 0  # edges whose link broke while attached
        self.edges_lost = 0  # placed calls ended because their edge member died
        self.unclaimed_cancelled = 0
        dispatcher.add_job_observer(self)

    async def join(
        self,
        job_id: str,
        pool: str,
        *,
        max_wait_s: float,
        room: str,
        metadata: Mapping[str, str],
        create: bool,
        link: EdgeLink,
    ) -> None:
        """Attach `link` to the job (requesting it when `create` and it is not
        known); every answer goes to `link`. Raises `ClusterRefusal` when this
        member may not let the request in."""
        d = self._d
        c = self._calls.get(job_id)
        job = d.live_job(job_id)
        if c is None and job is None:
            if create and job_id not in self._ended:
                self._calls[job_id] = _HubCall(job_id, link)
                link.joined()  # first: the job may be placed inside request()
                try:
                    d.request(
                        pool,
                        room=room,
                        metadata=json.dumps({**metadata, "sip.edge": link.edge_id}),
                        max_wait_s=max_wait_s,
                        job_id=job_id,
                        sip=_sip_record(metadata),
                    )
                except BaseException:
                    self._calls.pop(job_id, None)
                    link.unknown()
                    raise
                return
            rec = await d.find_job(job_id)
            if job_id in self._calls or d.live_job(job_id) is not None:  # came meanwhile
                return await self.join(
                    job_id,
                    pool,
                    max_wait_s=max_wait_s,
                    room=room,
                    metadata=metadata,
                    create=False,
                    link=link,
                )
            if rec is not None:
                link.refused(ended_reason(rec))
            else:
                link.unknown()  # not carried over here yet, or never requested
            return
        first = _job_metadata(job) if job is not None else {}
        if job is not None and first.get("sip.trunk") != metadata.get("sip.trunk"):
            # Admitted on another trunk (its ACL and credentials): not this call.
            link.refused("the call's job belongs to another trunk")
            return
        if c is None:
            # Live here but not ours yet: carried over (queued), or adopted from
            # a migrating worker (placed at the old owner: only its edge has it).
            assert job is not None
            if job.placed_at is not None and first.get("sip.edge") != link.edge_id:
                link.refused("the call was placed through another cluster member")
                return
            c = self._calls[job_id] = _HubCall(job_id, None, told=job.placed_at is not None)
        old = c.link
        if old is not None and old is not link:
            if old.edge_id != link.edge_id:
                # Its edge is alive: never taken over (Call-ID, tags and CSeq
                # travel in clear text; a third party must not steal a call).
                link.refused("the call is in progress at another cluster member")
                return
            old.close()  # the same edge joining again after its link broke
        c.link = link
        link.joined()
        if job is not None and job.placed_at is not None and not c.told:
            # Placed while no edge was attached (its first edge died queued).
            c.told = True
            if c.unclaimed is not None:
                c.unclaimed.cancel()
                c.unclaimed = None
            link.placed(job_id, job.worker_id or "")

    def link_lost(self, job_id: str, link: EdgeLink) -> None:
        """`link`'s edge is gone (its connection broke)."""
        c = self._calls.get(job_id)
        if c is None or c.link is not link:
            return
        c.link = None
        self.links_lost += 1
        log.info("sip call's edge link lost", extra={"job_id": job_id, "edge": link.edge_id})
        if c.told:
            # The call's dialog ran through that member: nobody can carry it on.
            self.edges_lost += 1
            d = self._d
            d.annotate(job_id, "sip_edge_lost", link.edge_id)
            d.cancel(job_id, "SIP call's edge member is gone (its link to the pool owner broke)")

    def control(self, op: str, job_id: str, edge_id: str, detail: str) -> bool:
        """The edge's cancel / release / final for its job; False when another
        edge holds the call now, or nothing was done."""
        c = self._calls.get(job_id)
        if c is not None and c.link is not None and c.link.edge_id != edge_id:
            return False
        d = self._d
        if op == "final":
            return d.sip_final(job_id, int(detail)) if detail.isdigit() else False
        link = None
        if c is not None:
            link = c.link
            self._forget(c)
        if op == "cancel":
            d.annotate(job_id, "sip_cancel", detail)
            done = d.cancel(job_id, f"SIP call ended before placement: {detail}")
        else:
            done = d.annotate(job_id, "sip_call_ended", detail) and d.cancel(
                job_id, f"SIP call ended: {detail}"
            )
        if link is not None:
            link.close()
        return done

    def _forget(self, c: _HubCall) -> None:
        self._calls.pop(c.job_id, None)
        if c.unclaimed is not None:
            c.unclaimed.cancel()
            c.unclaimed = None

    # ------------------------------------------------------- JobObserver

    def job_placed(self, job: Job) -> None:
        c = self._calls.get(job.id)
        if c is None:
            if not _is_sip_job(job):
                return
            c = self._calls[job.id] = _HubCall(job.id, None)  # carried over, no edge yet
        if c.told:
            return
        if c.link is not None:
            c.told = True
            c.link.placed(job.id, job.worker_id or "")
        elif c.unclaimed is None:
            loop = asyncio.get_running_loop()
            c.unclaimed = loop.call_later(self.reattach_s, self._unclaimed, job.id)

    def job_ended(self, job: Job) -> None:
        c = self._calls.get(job.id)
        if c is None:
            return
        self._ended[job.id] = None
        if len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)
        self._forget(c)
        link = c.link
        if link is None:
            return
        if c.told:
            link.ended()
        else:
            link.refused(job.reason if job.state is not JobState.CANCELLED else "cancelled")

    def _unclaimed(self, job_id: str) -> None:
        c = self._calls.get(job_id)
        if c is None or c.told:
            return
        c.unclaimed = None
        self.unclaimed_cancelled += 1
        self._d.cancel(job_id, "SIP call's edge member is gone and no other member took the call")
