"""llm-ha's mitmproxy addons.

- `LlmHa`, the script's addon: declares the options, loads the profile, owns the running state, puts
  the client's real request back on streamed flows (`responseheaders`), and offers the commands.
- `FlowGate`, appended to the end of mitmproxy's addon chain: its `request` hook runs after the
  built-in addons, so a flow answered by server replay is left alone, and an intercepted flow is
  sent as the user edited it, once resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from mitmproxy import command, connection, contentviews, ctx, exceptions, flowfilter, http
from mitmproxy.tools.dump import DumpMaster

from .candidates import Candidate, CandidatePicker
from .contentview import llm_stream_view, remove_view
from .gate import AttemptRecord, Gate, GateResult, LlmRequest, describe_attempt, internal_error_answer
from .handoff import HandoffServer, StreamEnd
from .health import HealthTracker, Node, Outcome
from .modes import mode_url
from .panel import LivePanel
from .profile import Profile, ProfileError, load_profile
from .status import EventLog, StatusServer, build_status, parse_listen_address, status_table

logger = logging.getLogger("llm_ha")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream attempt drowns mitmproxy's log

META_KEY = "llm_ha"
_retiring: set[asyncio.Task] = set()  # module-level: outlives the addon object on script reload
TICK_S = 0.25


class Runtime:
    """Everything that lives as long as one loaded profile."""

    def __init__(self, profile: Profile, events: EventLog, upstream_proxy: str | None = None) -> None:
        self.profile = profile
        self.filter = flowfilter.parse(profile.match)
        self.events = events
        self.picker = CandidatePicker(profile)
        self.tracker = HealthTracker(profile.health_check, self.picker.all_nodes(), time.time())
        self.client = httpx.AsyncClient(trust_env=False, proxy=upstream_proxy,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.after_tick: Callable[[], None] | None = None
        self.gate = Gate(self.tracker, self.picker.limits, self.client, on_failover=self._on_failover)
        self.handoff = HandoffServer(self._on_stream_end)
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
        return self.picker.candidates(self.tracker, time.time())

    def status(self) -> dict:
        self._drain_events()  # events due by now are logged before the status shows their effect
        status = build_status(self.profile, self.tracker, self.events, time.time(), self.picker.limits.status)
        status["proxy"] = {"loop_lag_ms": round(max(self.loop_lags, default=0.0) * 1000, 1)}
        return status

    def find_nodes(self, name: str) -> list[Node]:
        """Nodes named by URL, by upstream name, or as `upstream URL`."""
        nodes = self.tracker.nodes
        found = [n for n in nodes if name in (n.url, n.upstream, str(n), f"{n.upstream}/{n.url}")]
        if not found:
            known = ", ".join(str(n) for n in nodes)
            raise exceptions.CommandError(f"llm-ha: no node {name!r} (known: {known})")
        return found

    def tick(self) -> None:
        self._drain_events()
        if self.after_tick:
            self.after_tick()

    def _drain_events(self) -> None:
        self.tracker.advance(time.time())
        for event in self.tracker.take_events():
            if event.action == "uneject":
                self.picker.limits.returned(Node(event.upstream, event.node), event.ts)
            self._log_health_event(event.to_dict())
            self.events.add(event.to_dict())

    async def _tick_forever(self) -> None:
        period = min(TICK_S, self.profile.health_check.interval / 2)
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            # How late the loop woke us: time every first byte also waited, blamed on no upstream.
            self.loop_lags.append(time.monotonic() - before - period)
            try:
                self.tick()
            except Exception:  # never let bookkeeping kill the ticker
                logger.exception("llm-ha: health tick failed")

    def _log_health_event(self, e: dict) -> None:
        where = f"{e['upstream']} {e['node']}"
        if e["action"] == "eject":
            why = f"failure rate {e['failure_rate']:.0f}%" if e["failure_rate"] is not None else "by hand"
            logger.warning(f"llm-ha: ejected {where} for {e['duration_s']:g}s (k={e['k']}, {why})")
        elif e["action"] == "uneject":
            logger.warning(f"llm-ha: {where} returns to rotation after its k={e['k']} ejection")
        else:
            logger.info(f"llm-ha: {where} healthy for a while, next ejection k={e['k']}")

    def _on_failover(self, failed: Candidate, following: Candidate, record: AttemptRecord) -> None:
        monitor = self.tracker.monitors[failed.node]
        self.events.add({"ts": time.time(), "action": "failover", "upstream": failed.upstream.name,
                         "node": failed.node.url, "k": monitor.k, "duration_s": None, "failure_rate": None,
                         "reason": record.outcome, "attempt_s": record.duration_s,
                         "to_upstream": following.upstream.name, "to_node": following.node.url})
        logger.debug(f"llm-ha: {describe_attempt(record)}, trying {following.upstream.name} {following.node.url}")

    def _on_stream_end(self, end: StreamEnd) -> None:
        node = end.stream.candidate.node
        self.tracker.attempt_ended(node)
        if end.outcome is Outcome.STREAM_CUT:
            self.tracker.record(node, Outcome.STREAM_CUT, time.time())


@dataclass
class _Handoff:
    """A streamed flow pointed at the hand-off server, until its answer ends."""

    original: http.Request  # the client's request, put back on the flow in `responseheaders`
    path: str
    record: AttemptRecord  # the winning attempt: its duration (or cut) is known only at the end


class LlmHa:
    # Flows handed off but not yet answered. Class-level: a script reload makes a new LlmHa (this module
    # stays imported), and the new one must still put back the real request of streams in flight.
    handoffs: dict[str, _Handoff] = {}

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.events = EventLog()
        self.gate = FlowGate(self)
        self.status_server: StatusServer | None = None
        self.panel: LivePanel | None = None
        self._panel_status: dict = {}
        self._running = False
        self._said_inert = False

    def load(self, loader) -> None:
        loader.add_option("llm_ha_profile", str, "",
                          "llm-ha: path to the YAML profile; empty: pass every flow through.")
        loader.add_option("llm_ha_status", str, "",
                          "llm-ha: HOST:PORT to serve GET /status and GET /metrics; keep it on loopback.")
        loader.add_option("llm_ha_panel", bool, False, "llm-ha: show the live panel in mitmdump.")
        loader.add_option("llm_ha_events", str, "", "llm-ha: path of a JSON-lines event log.")
        ctx.master.addons.add(self.gate)
        contentviews.add(llm_stream_view)

    def configure(self, updated: set[str]) -> None:
        if "llm_ha_events" in updated:
            self.events.close()
            self.events = EventLog(os.path.expanduser(ctx.options.llm_ha_events))
            if self.runtime:
                self.runtime.events = self.events
        if updated & {"llm_ha_profile", "mode"}:
            self._load_profile()
        if "llm_ha_status" in updated and ctx.options.llm_ha_status:
            try:
                parse_listen_address(ctx.options.llm_ha_status)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if self._running and "llm_ha_status" in updated:
            asyncio.ensure_future(self._restart_status_server())
        if self._running and updated & {"llm_ha_panel", "llm_ha_profile"}:
            self._update_panel()

    async def running(self) -> None:
        self._running = True
        if self.runtime:
            self._adjust_mitmproxy_options()
            await self.runtime.ensure_started()
        else:
            self._say_inert()
        await self._restart_status_server()
        self._update_panel()

    def done(self) -> None:
        remove_view()
        if self.panel:
            self.panel.stop()
            self.panel = None
        with contextlib.suppress(ValueError, exceptions.AddonManagerError):
            ctx.master.addons.remove(self.gate)
        self._replace_runtime(None)
        if self.status_server:
            asyncio.ensure_future(self.status_server.stop())
        self.events.close()

    # -- the profile

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

    async def _restart_status_server(self) -> None:
        if self.status_server:
            await self.status_server.stop()
            self.status_server = None
        if ctx.options.llm_ha_status:
            host, port = parse_listen_address(ctx.options.llm_ha_status)
            server = StatusServer(self.status, host, port)
            try:
                await server.start()
            except OSError as e:
                logger.error(f"llm-ha: cannot serve status on {ctx.options.llm_ha_status}: {e.strerror or e}")
                return
            self.status_server = server
            logger.info(f"llm-ha: status at {server.url}/status and {server.url}/metrics")

    def status(self) -> dict:
        if self.runtime is None:
            return {"now": time.time(), "profile": None, "upstreams": [], "failovers": 0, "events": []}
        return self.runtime.status()

    # -- the live panel (mitmdump only: in the console UI the terminal is the UI's)

    def _update_panel(self) -> None:
        wanted = ctx.options.llm_ha_panel and self.runtime is not None
        if not wanted:
            if self.panel:
                self.panel.stop()
                self.panel = None
            return
        self.runtime.after_tick = self._refresh_panel_status
        self._refresh_panel_status()
        if self.panel:
            return
        if not isinstance(ctx.master, DumpMaster):
            logger.info("llm-ha: the panel runs in mitmdump; beside the console use `python -m llmha.panel` "
                        "with llm_ha_status set")
            return
        panel = LivePanel(lambda: self._panel_status)
        if panel.start():
            self.panel = panel
        else:
            logger.info("llm-ha: llm_ha_panel is on but stdout is not a terminal: no panel")

    def _refresh_panel_status(self) -> None:
        # The panel draws from its own thread: it reads this snapshot, taken on the event loop.
        if self.panel is not None or ctx.options.llm_ha_panel:
            self._panel_status = self.status()

    # -- flows: put the real request back once the handed-off stream answers

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        handoff = self.handoffs.get(flow.id)
        if handoff:
            flow.request.data = handoff.original.data
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._end_handoff(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        handoff = self._end_handoff(flow)
        if handoff and self.runtime:
            self.runtime.handoff.release(handoff.path)

    def _end_handoff(self, flow: http.HTTPFlow) -> _Handoff | None:
        """Put the real request back and record the streamed attempt's duration (or cut) on the flow."""
        handoff = self.handoffs.pop(flow.id, None)
        if handoff is None:
            return None
        flow.request.data = handoff.original.data
        meta = flow.metadata.get(META_KEY)
        if meta:
            meta["attempts"][-1] = handoff.record.to_dict()
            flow.comment = meta["summary"] = summarize(meta["attempts"])
        return handoff

    # -- commands

    @command.command("llm_ha.status")
    def status_command(self) -> None:
        """Print each node's state, k and counters to the event log."""
        logger.warning("llm-ha status:\n" + status_table(self._need_runtime().status()))

    @command.command("llm_ha.eject")
    def eject_command(self, node: str) -> None:
        """Eject a node by hand (URL, upstream name, or 'upstream URL'), as if it had failed."""
        runtime = self._need_runtime()
        for n in runtime.find_nodes(node):
            runtime.tracker.eject(n, time.time())
        runtime.tick()

    @command.command("llm_ha.restore")
    def restore_command(self, node: str) -> None:
        """End a node's ejection now."""
        runtime = self._need_runtime()
        for n in runtime.find_nodes(node):
            runtime.tracker.restore(n, time.time())
        runtime.tick()

    @command.command("llm_ha.reset")
    def reset_command(self) -> None:
        """Put every node back in rotation with k = 1 and clear the counters."""
        self._need_runtime().tracker.reset(time.time())
        logger.warning("llm-ha: health state reset")

    def _need_runtime(self) -> Runtime:
        if self.runtime is None:
            raise exceptions.CommandError("llm-ha: no profile loaded (set llm_ha_profile)")
        return self.runtime


class FlowGate:
    """The data path: runs last in the `request` hook and sends LLM flows through the gate."""

    def __init__(self, owner: LlmHa) -> None:
        self.owner = owner

    async def request(self, flow: http.HTTPFlow) -> None:
        runtime = self.owner.runtime
        if runtime is None or not flow.live or flow.response or flow.error:
            return
        if not runtime.filter(flow) or flow.request.raw_content is None:
            return
        while flow.intercepted:  # let the user edit first; kill() ends the wait too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flow.wait_for_resume(), 0.5)
        if flow.error or flow.response:
            return
        await runtime.ensure_started()
        request = LlmRequest.parse_body(flow.request.method, flow.request.path,
                                        list(flow.request.headers.items(multi=True)), flow.request.raw_content)
        try:
            result = await runtime.gate.run(request, runtime.candidates())
        except Exception:  # a bug of ours must not send the flow on unguarded: answer with an error
            logger.exception("llm-ha: the gate failed on this request")
            result = GateResult(answer=internal_error_answer())
        self._deliver(flow, runtime, result)

    def _deliver(self, flow: http.HTTPFlow, runtime: Runtime, result: GateResult) -> None:
        attempts = [a.to_dict() for a in result.attempts]
        summary = summarize(attempts)
        flow.metadata[META_KEY] = {"profile": runtime.profile.name, "upstream": result.upstream_name,
                                   "attempts": attempts, "summary": summary, "streamed": bool(result.stream)}
        flow.comment = summary
        extra = [("x-llm-ha-upstream", result.upstream_name), ("x-llm-ha-attempts", str(len(attempts)))]
        if result.stream:
            path = runtime.handoff.register(result.stream, extra)
            self.owner.handoffs[flow.id] = _Handoff(flow.request, path, result.stream.record)
            _point_at_handoff(flow, runtime.handoff.port, path)
        else:
            answer = result.answer
            headers = [(k.encode(), v.encode()) for k, v in [*answer.headers, *extra]]
            flow.response = http.Response.make(answer.status, answer.body, headers)


def _point_at_handoff(flow: http.HTTPFlow, port: int, path: str) -> None:
    hop = flow.request.copy()
    hop.scheme, hop.host, hop.port, hop.path = "http", "127.0.0.1", port, path
    hop.headers.pop("authorization", None)
    hop.content = b""
    flow.request = hop
    # A connection of its own, never through an upstream proxy: the hand-off server is on this machine.
    flow.server_conn = connection.Server(address=("127.0.0.1", port))


def summarize(attempts: Sequence[dict]) -> str:
    """`primary timeout 200ms -> fallback ok 83ms`."""
    return " -> ".join(describe_attempt(a) for a in attempts) or "llm-ha: no attempt"
