"""The profile addon: loads `llm_ha_profile` into a `Runtime`, the state that lives as long as one profile.

A `Runtime` holds the node pool (health, limits, leases), the candidate picker, the gate with its
HTTP client, the hand-off server, and the ticker that advances the detector's clock. The other
addons reach it through `RuntimeLoader.runtime`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import secrets
import socket
import time
from collections import deque
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, flowfilter, http
from mitmproxy.proxy import mode_specs

from ..core.candidates import Candidate, CandidatePicker
from ..core.health import HealthEvent
from ..core.nodes import NodePool
from ..core.profile import Profile, ProfileError, load_profile
from ..core.retry import RetryDiscipline
from ..core.splice import plan_resume
from ..core.status import build_status, is_loopback
from ..core.types import AttemptRecord, NodeId, Outcome, describe_attempt
from ..proxy.gate import Gate, LlmRequest, OpenStream
from ..proxy.handoff import HandoffServer, Relay, Resumer
from ..proxy.modes import mode_url
from ..proxy.prober import Prober
from ..proxy.upstream import UpstreamClient
from ..tasks import background
from .eventlog import EventLog

logger = logging.getLogger("llm_ha")

TICK_S = 0.25


def instance_id() -> str:
    """`host-pid-xxxx`: which llm-ha process this is, among several sharing state or behind a load balancer."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Runtime:
    """Everything that lives as long as one loaded profile."""

    def __init__(self, profile: Profile, events: EventLog, upstream_proxy: str | None = None,
                 instance: str = "") -> None:
        self.profile = profile
        self.filter = flowfilter.parse(profile.match)
        self.events = events
        self.instance = instance or instance_id()
        self.pool = self._node_pool()
        self.picker = CandidatePicker(profile)
        self.client = UpstreamClient(proxy=upstream_proxy)
        self.retry = RetryDiscipline(profile)
        self.gate = Gate(self.pool, self.client, on_failover=self._on_failover,
                         max_attempts=None if profile.transparent_failover else 1, retry=self.retry)
        self.prober = Prober(self.pool, self.client, profile.probe, self.events)
        self.handoff = HandoffServer()
        self._started: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self.loop_lags: deque[float] = deque(maxlen=20)

    def _node_pool(self) -> NodePool:
        if not self.profile.shared_state:
            return NodePool(self.profile, time.time(), listener=self._on_health_event)
        from ..shared.pool import SharedNodePool  # Redis's client is imported only by those who use it

        return SharedNodePool(self.profile, time.time(), listener=self._on_health_event, instance=self.instance)

    @property
    def started(self) -> bool:
        return self._started is not None

    async def ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self.handoff.start()
        if self.shared:
            await self.shared.start()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def retire(self) -> None:
        """Replaced (profile change, script reload): let the streams in flight finish, then stop."""
        await self.handoff.drain(max(u.request_timeout for u in self.profile.upstreams))
        await self.stop()

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        self.prober.stop()
        if self.shared:
            await self.shared.stop()
        await self.handoff.stop()
        await self.client.aclose()

    def candidates(self, api: str | None = None, model: object = None) -> list[Candidate]:
        """The request's candidates; for a request speaking `api`, only upstreams whose `protocols` list it
        (same-protocol failover). If none does, the primary, as if llm-ha did not know the API. `model`
        (the request body's) picks the health entries of upstreams with `health_scope: model`."""
        candidates = self.picker.candidates(self.pool, time.time(), model)
        if api is None:
            return candidates
        speaking = [c for c in candidates if api in c.upstream.protocols]
        return speaking or [c for c in candidates if c.is_primary] or candidates

    def selects(self, flow: http.HTTPFlow) -> bool:
        """An LLM flow: it matches the profile's `match`, and, if that is the default, goes to the primary.

        In reverse-proxy mode every flow goes to the primary. In the other modes (regular, upstream,
        ...) the client talks to any host: the default `match` then takes only flows addressed to one of
        the primary's nodes, so that no other host's traffic, and credentials, are ever redirected. A
        `match` written in the profile is taken as it is: the user chose what to redirect.
        """
        return self.filter(flow) and (self.profile.match_given or self.addresses_primary(flow))

    def addresses_primary(self, flow: http.HTTPFlow) -> bool:
        """The client talks to the primary: through the reverse proxy, to the proxy itself as its server
        (`base_url` = the proxy, in regular mode), or to one of the primary's nodes' host and port."""
        if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode) or _addresses_the_proxy(flow):
            return True
        return (flow.request.host.lower(), flow.request.port) in self._primary_addresses

    @functools.cached_property
    def _primary_addresses(self) -> set[tuple[str, int]]:
        urls = [urlsplit(url) for url in self.profile.upstreams[0].nodes]
        return {((u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)) for u in urls}

    def status(self) -> dict:
        status = {"instance": self.instance, **build_status(self.pool, self.events, time.time())}
        status["proxy"] = {"loop_lag_ms": round(max(self.loop_lags, default=0.0) * 1000, 1)}
        self._add_retry_status(status)
        if self.shared:
            status["shared_state"] = self.shared.describe()
        return status

    def _add_retry_status(self, status: dict) -> None:
        """Each upstream's retry budget and each node's `Retry-After` wait, beside what the pool knows."""
        now = time.time()
        for upstream in status["upstreams"]:
            upstream["retry_budget"] = self.retry.describe(upstream["name"], now)
            for node in upstream["nodes"]:
                node["not_before_s"] = round(self.retry.pacing.wait_s(NodeId(upstream["name"], node["url"]), now), 3)

    @property
    def shared(self):
        """The pool shared with other instances through Redis (`SharedNodePool`), if the profile has one."""
        return self.pool if self.profile.shared_state else None

    def resumer(self, request: LlmRequest, attempts: list[AttemptRecord]) -> Resumer:
        """How a stream of `request` that breaks is continued: on the next candidates that may resume."""

        async def resume(relay: Relay, broken: OpenStream, outcome: Outcome) -> OpenStream | None:
            answer = relay.follower.answer
            plan = plan_resume(relay.follower.protocol, answer, request.payload)
            candidates = [c for c in self.candidates(request.api, request.payload.get("model"))
                          if c.upstream.resume != "off" and c.node != broken.candidate.node]
            if not plan.possible or not candidates:
                relay.why_not_resumed = plan.reason or "no upstream may resume it (resume: off)"
                return None
            result = await self.gate.run(request.continued(answer), candidates)
            attempts.extend(result.attempts)
            if result.stream is None:
                relay.why_not_resumed = "; ".join(describe_attempt(a) for a in result.attempts)
                return None
            result.stream.record.resumed = True
            self._on_resume(broken, result.stream, outcome, answer.events)
            return result.stream

        return resume

    def _on_resume(self, broken: OpenStream, continuation: OpenStream, outcome: Outcome, events: int) -> None:
        self.pool[continuation.candidate.node].resumes += 1
        to = continuation.candidate
        self.events.add({"ts": time.time(), "action": "resume", "upstream": broken.candidate.upstream.name,
                         "node": broken.candidate.node.url, "k": self.pool[broken.candidate.node].monitor.k,
                         "duration_s": None, "failure_rate": None, "reason": outcome.value, "events": events,
                         "to_upstream": to.upstream.name, "to_node": to.node.url})
        logger.info(f"llm-ha: {broken.candidate.upstream.name} {broken.candidate.node.url} {outcome.value} after "
                    f"{events} events; resumed on {to.upstream.name} {to.node.url}")

    def find_nodes(self, name: str) -> list[NodeId]:
        """Nodes named by URL, by upstream name, or as `upstream URL`; a model's health entry on a node
        (`health_scope: model`) as any of these followed by `#model`."""
        nodes = list(self.pool.nodes)
        named, _, model = name.partition("#")
        found = [n for n in nodes if named in (n.url, n.upstream, str(n), f"{n.upstream}/{n.url}")]
        if model:
            found = [e for n in found for e in self.pool.model_entries(n) if e.model == model]
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
                self.prober.tick(time.time())
            except Exception:  # never let bookkeeping kill the ticker
                logger.exception("llm-ha: health tick failed")

    def _on_health_event(self, event: HealthEvent) -> None:
        e = event.to_dict()
        where = f"{e['upstream']} {e['node']}" + (f"#{event.model}" if event.model else "")  # a model's entry
        if e["action"] == "eject":
            why = f"failure rate {e['failure_rate']:.0f}%" if e["failure_rate"] is not None else "by hand"
            logger.warning(f"llm-ha: ejected {where} for {e['duration_s']:g}s (k={e['k']}, {why})")
        elif e["action"] == "uneject" and event.by == "probe":
            logger.warning(f"llm-ha: {where} returns early: its probes passed (k={e['k']} ejection cut short)")
        elif e["action"] == "hold":
            logger.warning(f"llm-ha: {where} ejection over, but out until a probe passes (k={e['k']})")
        elif e["action"] == "uneject" and event.by:
            logger.warning(f"llm-ha: {where} restored by hand, its k={e['k']} ejection cut short")
        elif e["action"] == "uneject":
            logger.warning(f"llm-ha: {where} returns to rotation after its k={e['k']} ejection")
        elif e["action"] == "reset":
            logger.warning(f"llm-ha: {where} reset by hand: in rotation, k=1, counters cleared")
        else:
            logger.info(f"llm-ha: {where} healthy for a while, next ejection k={e['k']}")
        self.events.add(e)

    def _on_failover(self, failed: Candidate, following: Candidate, record: AttemptRecord) -> None:
        self.events.add({"ts": time.time(), "action": "failover", "upstream": failed.upstream.name,
                         "node": failed.node.url, "k": self.pool[failed.node].monitor.k, "duration_s": None,
                         "failure_rate": None, "reason": record.outcome, "attempt_s": record.duration_s,
                         "to_upstream": following.upstream.name, "to_node": following.node.url})
        logger.debug(f"llm-ha: {describe_attempt(record)}, trying {following.upstream.name} {following.node.url}")


def _addresses_the_proxy(flow: http.HTTPFlow) -> bool:
    """The request names the proxy's own address (its Host header, in a regular-mode origin-form request)."""
    sockname = flow.client_conn.sockname
    if not sockname or flow.request.port != sockname[1]:
        return False
    host = flow.request.host.lower()
    return host in (str(sockname[0]).lower(), "localhost", socket.gethostname().lower()) or is_loopback(host)


class RuntimeLoader:
    """Declares `llm_ha_profile`, loads it, and owns the running `Runtime`."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.instance = instance_id()  # one per process: names it in /status and in shared state
        self.runtime: Runtime | None = None
        self._running = False
        self._said_inert = False

    def load(self, loader) -> None:
        loader.add_option("llm_ha_profile", str, "",
                          "llm-ha: path to the YAML profile; empty: pass every flow through.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"llm_ha_profile", "mode"}:
            self._load_profile()
        if "save_stream_file" in updated and self._running and self.runtime:
            self._adjust_mitmproxy_options()  # a recording started later must hold the streamed answers too
        if "stream_large_bodies" in updated and self._running and self.runtime and ctx.options.stream_large_bodies:
            raise exceptions.OptionsError("llm-ha: stream_large_bodies cannot be set while a profile is loaded: "
                                          "mitmproxy would send LLM requests on before the gate, and twice")

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
            return {"instance": self.instance, "now": time.time(), "profile": None, "upstreams": [], "failovers": 0,
                    "events": []}
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
            runtime = Runtime(profile, self.events, upstream_proxy=mode_url(ctx.options.mode, "upstream"),
                              instance=self.instance)
        except ProfileError as e:
            self._refuse(str(e))
            return
        except ValueError as e:  # the match filter
            self._refuse(f"{path}: match: not a valid mitmproxy filter expression ({e})")
            return
        previous = self.runtime.profile if self.runtime else None
        self._replace_runtime(runtime)
        upstreams = " -> ".join(f"{u.name} ({len(u.nodes)} node{'s' * (len(u.nodes) > 1)})" for u in profile.upstreams)
        logger.info(f"llm-ha: profile {profile.name}: {upstreams}; flows matching {profile.match!r}")
        if previous:
            logger.warning(f"llm-ha: profile reloaded: {', '.join(profile_changes(previous, profile))}; "
                           f"node health starts afresh")
        if self._running:
            self._adjust_mitmproxy_options()
            background(runtime.ensure_started())

    def _refuse(self, message: str) -> None:
        if self._running:
            raise exceptions.OptionsError(f"llm-ha: {message}")
        # At start-up, an error logged makes mitmproxy exit with it (its ErrorCheck addon): one clear line.
        logger.error(f"llm-ha: {message}")

    def _replace_runtime(self, runtime: Runtime | None) -> None:
        old, self.runtime = self.runtime, runtime
        if old and old.started:
            background(old.retire())

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
        if ctx.options.stream_large_bodies:
            # mitmproxy sends a large request body on to the server before any addon's `request` hook sees it,
            # and then the gate would send the LLM request a second time. llm-ha streams LLM answers itself.
            wanted["stream_large_bodies"] = None
        if not ctx.options.store_streamed_bodies and _keeps_flows():
            wanted["store_streamed_bodies"] = True  # recordings (-w) and the UIs must hold the streamed answers
        if wanted:
            settings = ", ".join(f"{k}={'off' if v is None else v}" for k, v in wanted.items())
            logger.info(f"llm-ha: setting {settings}")
            ctx.options.update(**wanted)


def _keeps_flows() -> bool:
    """Something keeps the flows once they are over: a recording (`-w`), or a UI's flow list (console, web).
    Plain mitmdump drops them; storing every streamed answer's body would then cost a copy per chunk for nobody."""
    return bool(getattr(ctx.options, "save_stream_file", None)) or getattr(ctx.master, "view", None) is not None


# -- what a profile reload changed, for the log

_SECRET_FIELDS = {"api_key", "shared_state"}  # said to have changed, never shown
_NOT_DURATIONS = {"failure_rate_threshold", "min_requests", "max_inflight", "min_inflight"}


def profile_changes(old: Profile, new: Profile) -> list[str]:
    """`first_byte_timeout 300ms -> 1s`, `fallback.model qwen-plus -> qwen-max`, `upstream backup added`.

    A setting changed the same way on every upstream (a top-level default) is named once, unprefixed.
    """
    changes = [f"{name} {text}" for name, text in _field_changes(old, new, skip={"upstreams", "health_check"}).items()]
    changes += [f"health_check.{name} {text}" for name, text in _field_changes(old.health_check, new.health_check).items()]
    before, after = {u.name: u for u in old.upstreams}, {u.name: u for u in new.upstreams}
    changes += [f"upstream {name} removed" for name in before if name not in after]
    changes += [f"upstream {name} added" for name in after if name not in before]
    kept = [name for name in after if name in before]
    if [n for n in before if n in after] != kept:
        changes.append(f"upstream order {', '.join(n for n in before if n in after)} -> {', '.join(kept)}")
    per_upstream = {name: _field_changes(before[name], after[name]) for name in kept}
    everywhere = {field: text for field, text in (per_upstream[kept[0]] if kept else {}).items()
                  if all(changed.get(field) == text for changed in per_upstream.values())}
    changes += [f"{field} {text}" for field, text in everywhere.items()]
    changes += [f"{name}.{field} {text}" for name, changed in per_upstream.items()
                for field, text in changed.items() if field not in everywhere]
    return changes or ["no setting changed"]


def _field_changes(old, new, skip: set[str] = frozenset()) -> dict[str, str]:
    changes = {}
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name not in skip and before != after:
            shown = "changed" if f.name in _SECRET_FIELDS else f"{_shown(f.name, before)} -> {_shown(f.name, after)}"
            changes[f.name] = shown
    return changes


def _shown(name: str, value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float) and name not in _NOT_DURATIONS:
        return f"{value * 1000:g}ms" if 0 < value < 1 else f"{value:g}s"
    if name == "failure_rate_threshold":
        return f"{value:g}%"
    return str(value)
