"""The flow gate addon: the data path. LLM flows go through the gate; streamed answers through the hand-off.

Its `request` hook must run after mitmproxy's built-in addons (a flow answered by server replay is
left alone, an intercepted flow is sent as the user edited it, once resumed), while a script's
addons run before them: so `load` appends the hook to the end of mitmproxy's addon chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy import connection, ctx, exceptions, http

from ..core.types import META_KEY, AttemptRecord, describe_attempt
from ..proxy.gate import GateResult, LlmRequest, internal_error_answer
from .runtime import Runtime, RuntimeLoader

logger = logging.getLogger("llm_ha")


@dataclass
class _Handoff:
    """A streamed flow pointed at the hand-off server, until its answer ends."""

    original: http.Request  # the client's request, put back on the flow in `responseheaders`
    path: str
    record: AttemptRecord  # the winning attempt: its duration (or cut) is known only at the end
    runtime: Runtime


# Flows handed off but not yet answered. Module-level: a script reload makes new addons (this module
# stays imported), and they must still put back the real request of streams in flight.
_handoffs: dict[str, _Handoff] = {}


class FlowGate:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader
        self.last = _LastInChain(self)

    def load(self, loader) -> None:
        ctx.master.addons.add(self.last)

    def done(self) -> None:
        with contextlib.suppress(ValueError, exceptions.AddonManagerError):
            ctx.master.addons.remove(self.last)

    async def gate_request(self, flow: http.HTTPFlow) -> None:
        runtime = self.loader.runtime
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
            _handoffs[flow.id] = _Handoff(flow.request, path, result.stream.record, runtime)
            _point_at_handoff(flow, runtime.handoff.port, path)
        elif result.answer:
            answer = result.answer
            headers = [(k.encode(), v.encode()) for k, v in [*answer.headers, *extra]]
            flow.response = http.Response.make(answer.status, answer.body, headers)

    # -- streamed flows: put the real request back once the handed-off stream answers

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        handoff = _handoffs.get(flow.id)
        if handoff:
            flow.request.data = handoff.original.data
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._end_handoff(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        handoff = self._end_handoff(flow)
        if handoff:
            handoff.runtime.handoff.release(handoff.path)

    def _end_handoff(self, flow: http.HTTPFlow) -> _Handoff | None:
        """Put the real request back and record the streamed attempt's duration (or cut) on the flow."""
        handoff = _handoffs.pop(flow.id, None)
        if handoff is None:
            return None
        flow.request.data = handoff.original.data
        meta = flow.metadata.get(META_KEY)
        if meta:
            meta["attempts"][-1] = handoff.record.to_dict()
            flow.comment = meta["summary"] = summarize(meta["attempts"])
        return handoff


class _LastInChain:
    """The gate's `request` hook, added at the end of mitmproxy's addon chain."""

    def __init__(self, gate: FlowGate) -> None:
        self.gate = gate

    async def request(self, flow: http.HTTPFlow) -> None:
        await self.gate.gate_request(flow)


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
