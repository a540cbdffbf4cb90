"""Config reload without a restart: re-read the file, validate it whole, apply
what can change live, say what changed.

Theory of operation
-------------------
`Reloader.reload()` reads `config.source` again with the same loader as the
start (`load_config`: every error in every section, each naming its key),
then checks what only a live server can: a Kubernetes pool's new pod template
must load (`kubernetes_pods.load_template`), an autoscaled pool may not
appear, disappear or change provider, and a `[sip]` trunk may not go to
LiveKit SIP (`downstream_kind = "livekit"`) on a server that started without
one (its room binder starts with the server): those need a restart. Any
error, and nothing is applied: the `ConfigError` lists them all.

What applies live, in this order, each only if it changed:

- `[sip]` trunks: the SIP server resolves the new downstreams' host names,
  then swaps its whole trunk table at once (`SipServer.replace_trunks`): new
  calls are admitted and routed by it; calls in progress keep the trunk they
  started on to their end;
- `[keys]`: the authenticator serves the new set (tokens of a removed key stop
  working at once; connected workers stay connected);
- `[defaults]`, `[pools.*]` scheduling settings and the `[server]` limits:
  `Dispatcher.reconfigure` (new calls see them; running ones keep theirs);
- autoscaled pools: scaling settings at once; a changed version (command,
  env, pod template) starts a rollout (`RolloutManager.apply`).

Everything else (`[server]` host/port/logging/data_dir, `[store]`, `[livekit]`,
the `[sip]` listener keys (`sip.port`, `sip.host`, ...; adding or removing
`[sip]` itself), `[autoscale]`, `[kubernetes]`, `[cluster]`) is read at start
only: a change there is reported under `restart_needed` (and logged as needing
a restart) and not applied.

Reloads run one at a time (`reload` holds a lock across the name lookups).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from trunkline.auth import Authenticator
from trunkline.common.errors import ErrorCollector
from trunkline.config import Config, ConfigError, load_config
from trunkline.providers import ProviderError
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.rollout import RolloutManager
from trunkline.runtime.sip_server import SipServer
from trunkline.sip.config import SipConfig

log = logging.getLogger("trunkline.reload")

# `[server]` keys that apply live (the rest need a restart).
LIVE_SERVER_KEYS = ("max_worker_jobs", "max_trace_events", "max_queued")
RESTART_SECTIONS = ("store", "livekit", "autoscale", "kubernetes", "cluster")


@dataclasses.dataclass
class ReloadResult:
    """What a reload did: `changed` lists what applied (one line each),
    `restart_needed` what changed but applies only at start, `rollouts` what
    each autoscaled pool's rollout did."""

    source: str
    changed: list[str] = dataclasses.field(default_factory=list)
    restart_needed: list[str] = dataclasses.field(default_factory=list)
    rollouts: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reloader:
    """Reloads `current.source` into the running server; see the module docstring."""

    def __init__(
        self,
        current: Config,
        dispatcher: Dispatcher,
        auth: Authenticator,
        rollouts: RolloutManager | None = None,
        sip: SipServer | None = None,
    ) -> None:
        self.current = current
        self.dispatcher = dispatcher
        self.auth = auth
        self.rollouts = rollouts
        self.sip = sip
        # The room binder for LiveKit SIP trunks exists only if one was configured at start.
        self._room_binder = bool(
            current.livekit and current.sip and any(t.to_livekit for t in current.sip.trunks)
        )
        self._lock = asyncio.Lock()

    def load(self) -> Config:
        """The file's config, validated whole; `ConfigError` naming every bad key."""
        if not self.current.source:
            raise ConfigError("the server was started without a config file: nothing to reload")
        new = load_config(self.current.source, dev=self.current.dev)
        e = ErrorCollector()
        old_rp = self.current.replica_pools
        for name, rp in new.replica_pools.items():
            was = old_rp.get(name)
            where = f"pools.{name}"
            if was is None:
                e.add(where, "a new autoscaled pool needs a restart (its provider starts with it)")
            elif rp.provider != was.provider:
                e.add(f"{where}.provider", f"cannot change live ({was.provider} -> {rp.provider})")
            elif rp.provider == "kubernetes" and rp.version != was.version:
                from trunkline.providers.kubernetes_pods import load_template

                try:
                    load_template(rp.pod_template)
                except ProviderError as exc:
                    e.add(f"{where}.pod_template", str(exc))
        for name in old_rp:
            if name not in new.replica_pools:
                e.add(f"pools.{name}", "removing an autoscaled pool needs a restart")
        for trunk in new.sip.trunks if new.sip is not None and not self._room_binder else ():
            if trunk.to_livekit:
                e.add(
                    f"sip.trunks.{trunk.name}.downstream_kind",
                    '"livekit" on a server started without a LiveKit SIP trunk needs a '
                    "restart (the room binder starts with the server)",
                )
        e.raise_if_any()
        return new

    async def reload(self, canary: dict[str, float | None] | None = None) -> ReloadResult:
        """Load, validate and apply (see the module docstring). `canary` names
        pools to roll even if their version did not change (`trunkline
        rollout`), each with the canary share its rollout uses instead of its
        `rollout.canary_percent` (None: the pool's own)."""
        async with self._lock:
            return await self._reload(canary)

    async def _reload(self, canary: dict[str, float | None] | None) -> ReloadResult:
        new = self.load()
        old = self.current
        out = ReloadResult(source=old.source)
        await self._sip(old.sip, new.sip, out)
        if dict(new.keys) != dict(old.keys):
            added = sorted(set(new.keys) - set(old.keys))
            removed = sorted(set(old.keys) - set(new.keys))
            changed = sorted(k for k in set(new.keys) & set(old.keys) if new.keys[k] != old.keys[k])
            self.auth.set_keys(new.keys)
            out.changed.append(
                f"keys: {len(added)} added {added}, {len(removed)} removed {removed}, "
                f"{len(changed)} with a new secret {changed}"
            )
        sched_changed = []
        if new.defaults != old.defaults:
            sched_changed.append("defaults")
        for name in sorted(set(new.pools) | set(old.pools)):
            if new.pools.get(name) != old.pools.get(name):
                sched_changed.append(f"pools.{name}")
        for key in LIVE_SERVER_KEYS:
            if getattr(new.server, key) != getattr(old.server, key):
                sched_changed.append(f"server.{key}")
        if sched_changed:
            self.dispatcher.reconfigure(new)
            out.changed.append("scheduling: " + ", ".join(sched_changed))
        for f in dataclasses.fields(new.server):
            same = getattr(new.server, f.name) == getattr(old.server, f.name)
            if f.name not in LIVE_SERVER_KEYS and not same:
                out.restart_needed.append(f"server.{f.name}")
        for section in RESTART_SECTIONS:
            if getattr(new, section, None) != getattr(old, section, None):
                out.restart_needed.append(section)
        for name, rp in new.replica_pools.items():
            was = old.replica_pools[name]
            if rp == was and not canary:
                continue
            if rp.scale != was.scale:
                out.changed.append(f"pools.{name}: scaling settings")
            if self.rollouts is not None:
                asked = canary is not None and name in canary
                roll = rp.version != was.version or asked
                pct = canary.get(name) if canary else None
                said = self.rollouts.apply(name, rp, pct, roll=roll)
                if said:
                    out.rollouts[name] = said
        self.current = new
        if out.restart_needed:
            log.warning(
                "config changes need a restart",
                extra={"source": out.source, "keys": ",".join(out.restart_needed)},
            )
        log.info(
            "config reloaded",
            extra={
                "source": out.source,
                "changed": "; ".join(out.changed) or "-",
                "restart_needed": ",".join(out.restart_needed) or "-",
                "rollouts": "; ".join(f"{k}: {v}" for k, v in out.rollouts.items()) or "-",
            },
        )
        return out

    async def _sip(self, old: SipConfig | None, new: SipConfig | None, out: ReloadResult) -> None:
        """`[sip]`: the trunks apply live; listener keys, or the section
        appearing or going away, need a restart."""
        if old is None or new is None or self.sip is None:
            if old != new:
                out.restart_needed.append("sip")
            return
        for f in dataclasses.fields(SipConfig):
            if f.name != "trunks" and getattr(old, f.name) != getattr(new, f.name):
                out.restart_needed.append(f"sip.{f.name}")
        if set(old.trunks) != set(new.trunks):
            changes = await self.sip.replace_trunks(new.trunks)
            out.changed.append(changes.describe())
