"""The profile addon: loads `llm_ha_profile` into a `Runtime`, the state that lives as long as one profile.

A `Runtime` holds the node pool (health, limits, leases), the candidate picker, the gate with its
HTTP client, the hand-off server, and the ticker that advances the detector's clock. The other
addons reach it through `RuntimeLoader.runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque

import httpx
from mitmproxy import ctx, exceptions, flowfilter

from ..core.candidates import Candidate, CandidatePicker
from ..core.health import HealthEvent
from ..core.nodes import NodePool
from ..core.profile import Profile, ProfileError, load_profile
from ..core.status import build_status
from ..core.types import AttemptRecord, NodeId, describe_attempt
from ..proxy.gate import Gate
from ..proxy.handoff import HandoffServer
from ..proxy.modes import mode_url
from .eventlog import EventLog

logger = logging.getLogger("llm_ha")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream attempt drowns mitmproxy's log

_retiring: set[asyncio.Task] = set()  # module-level: outlives the addon object on script reload
TICK_S = 0.25


class Runtime:
    """Everything that lives as long as one loaded profile."""

    def __init__(self, profile: Profile, events: EventLog, upstream_proxy: str | None = None) -> None:
        self.profile = profile
        self.filter = flowfilter.parse(profile.match)
        self.events = events
        self.pool = NodePool(profile, time.time(), listener=self._on_health_event)
        self.picker = CandidatePicker(profile)
        self.client = httpx.AsyncClient(trust_env=False, proxy=upstream_proxy,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.gate = Gate(self.pool, self.client, on_failover=self._on_failover,
                         max_attempts=None if profile.transparent_failover else 1)
        self.handoff = HandoffServer()
        self._started: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self.loop_lags: deque[float] = deque(maxlen=20)

    @property
    def started(self) -> bool:
        return self._started is not None

    async def ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self.handoff.start()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def retire(self) -> None:
        """Replaced (profile change, script reload): let the streams in flight finish, then stop."""
        await self.handoff.drain(max(u.request_timeout for u in self.profile.upstreams))
        await self.stop()

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        await self.handoff.stop()
        await self.client.aclose()

    def candidates(self) -> list[Candidate]:
        return self.picker.candidates(self.pool, time.time())

    def status(self) -> dict:
        status = build_status(self.pool, self.events, time.time())
        status["proxy"] = {"loop_lag_ms": round(max(self.loop_lags, default=0.0) * 1000, 1)}
        return status

    def find_nodes(self, name: str) -> list[NodeId]:
        """Nodes named by URL, by upstream name, or as `upstream URL`."""
        nodes = list(self.pool.nodes)
        found = [n for n in nodes if name in (n.url, n.upstream, str(n), f"{n.upstream}/{n.url}")]
        if not found:
            known = ", ".join(str(n) for n in nodes)
            raise exceptions.CommandError(f"llm-ha: no node {name!r} (known: {known})")
        return found

    async def _tick_forever(self) -> None:
        period = min(TICK_S, self.profile.health_check.interval / 2)
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            # How late the loop woke us: time every first byte also waited, blamed on no upstream.
            self.loop_lags.append(time.monotonic() - before - period)
            try:
                self.pool.advance(time.time())  # ejections and returns happen on time, traffic or not
            except Exception:  # never let bookkeeping kill the ticker
                logger.exception("llm-ha: health tick failed")

    def _on_health_event(self, event: HealthEvent) -> None:
        e = event.to_dict()
        where = f"{e['upstream']} {e['node']}"
        if e["action"] == "eject":
            why = f"failure rate {e['failure_rate']:.0f}%" if e["failure_rate"] is not None else "by hand"
            logger.warning(f"llm-ha: ejected {where} for {e['duration_s']:g}s (k={e['k']}, {why})")
        elif e["action"] == "uneject":
            logger.warning(f"llm-ha: {where} returns to rotation after its k={e['k']} ejection")
        else:
            logger.info(f"llm-ha: {where} healthy for a while, next ejection k={e['k']}")
        self.events.add(e)

    def _on_failover(self, failed: Candidate, following: Candidate, record: AttemptRecord) -> None:
        self.events.add({"ts": time.time(), "action": "failover", "upstream": failed.upstream.name,
                         "node": failed.node.url, "k": self.pool[failed.node].monitor.k, "duration_s": None,
                         "failure_rate": None, "reason": record.outcome, "attempt_s": record.duration_s,
                         "to_upstream": following.upstream.name, "to_node": following.node.url})
        logger.debug(f"llm-ha: {describe_attempt(record)}, trying {following.upstream.name} {following.node.url}")


class RuntimeLoader:
    """Declares `llm_ha_profile`, loads it, and owns the running `Runtime`."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.runtime: Runtime | None = None
        self._running = False
        self._said_inert = False

    def load(self, loader) -> None:
        loader.add_option("llm_ha_profile", str, "",
                          "llm-ha: path to the YAML profile; empty: pass every flow through.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"llm_ha_profile", "mode"}:
            self._load_profile()

    async def running(self) -> None:
        self._running = True
        if self.runtime:
            self._adjust_mitmproxy_options()
            await self.runtime.ensure_started()
        else:
            self._say_inert()

    def done(self) -> None:
        self._replace_runtime(None)

    def status(self) -> dict:
        if self.runtime is None:
            return {"now": time.time(), "profile": None, "upstreams": [], "failovers": 0, "events": []}
        return self.runtime.status()

    def need_runtime(self) -> Runtime:
        if self.runtime is None:
            raise exceptions.CommandError("llm-ha: no profile loaded (set llm_ha_profile)")
        return self.runtime

    def _load_profile(self) -> None:
        path = ctx.options.llm_ha_profile
        if not path:
            self._replace_runtime(None)
            if self._running:
                self._say_inert()
            return
        try:
            profile = load_profile(os.path.expanduser(path), reverse_target=mode_url(ctx.options.mode, "reverse"))
            if self.runtime and self.runtime.profile == profile:
                return  # unchanged (e.g. mitmproxy rolling back a refused change): keep the health state
            runtime = Runtime(profile, self.events, upstream_proxy=mode_url(ctx.options.mode, "upstream"))
        except ProfileError as e:
            self._refuse(str(e))
            return
        except ValueError as e:  # the match filter
            self._refuse(f"{path}: match: not a valid mitmproxy filter expression ({e})")
            return
        self._replace_runtime(runtime)
        upstreams = " -> ".join(f"{u.name} ({len(u.nodes)} node{'s' * (len(u.nodes) > 1)})" for u in profile.upstreams)
        logger.info(f"llm-ha: profile {profile.name}: {upstreams}; flows matching {profile.match!r}")
        if self._running:
            self._adjust_mitmproxy_options()
            asyncio.ensure_future(runtime.ensure_started())

    def _refuse(self, message: str) -> None:
        if self._running:
            raise exceptions.OptionsError(f"llm-ha: {message}")
        # At start-up, an error logged makes mitmproxy exit with it (its ErrorCheck addon): one clear line.
        logger.error(f"llm-ha: {message}")

    def _replace_runtime(self, runtime: Runtime | None) -> None:
        old, self.runtime = self.runtime, runtime
        if old and old.started:
            task = asyncio.ensure_future(old.retire())
            _retiring.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(_retiring.discard)

    def _say_inert(self) -> None:
        if not self._said_inert:
            self._said_inert = True
            logger.info("llm-ha: no llm_ha_profile set; every flow passes through untouched.")

    def _adjust_mitmproxy_options(self) -> None:
        wanted = {}
        if "connection_strategy" not in ctx.options:  # a harness without the proxy's options
            return
        if ctx.options.connection_strategy != "lazy":
            # Eager mode connects to the reverse target before any hook runs and drops the client when it
            # is down; llm-ha must serve from the fallback then.
            wanted["connection_strategy"] = "lazy"
        if not ctx.options.store_streamed_bodies:
            wanted["store_streamed_bodies"] = True  # recordings (-w) must hold the streamed answers
        if wanted:
            logger.info(f"llm-ha: setting {', '.join(f'{k}={v}' for k, v in wanted.items())}")
            ctx.options.update(**wanted)
