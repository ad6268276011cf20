"""The flow gate addon: the data path. LLM flows go through the gate; streamed answers through the hand-off.

Its `request` hook must run after mitmproxy's built-in addons (a flow answered by server replay is
left alone, an intercepted flow is sent as the user edited it, once resumed), while a script's
addons run before them: so `load` appends the hook to the end of mitmproxy's addon chain. A flow
handed off gets its answer's head in `responseheaders`, before any other addon sees the response:
that hook is put at the start of the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.flow import Error

from ..core.candidates import Candidate
from ..core.splice import StreamFollower
from ..core.types import META_KEY, Outcome, describe_attempt
from ..proxy.gate import CLIENT_CREDENTIALS, CompleteAnswer, GateResult, LlmRequest, internal_error_answer, with_stream_decided
from ..proxy.handoff import Parcel, Relay, answer_head
from .runtime import Runtime, RuntimeLoader

logger = logging.getLogger("llm_ha")


@dataclass
class _Handoff:
    """A flow pointed at the hand-off server, until its answer ends."""

    original: http.RequestData  # the client's request, put back on the flow in `responseheaders`
    result: GateResult  # its attempts so far; continuations add theirs
    runtime: Runtime
    path: str = ""
    gate: asyncio.Task | None = None  # the gate still looking for the answer, for a streamed request
    parcel: Parcel | None = None  # the gate's answer: its head is the flow's response head

    def stop_gate(self) -> None:
        if self.gate is not None:
            self.gate.cancel()


# Flows handed off but not yet answered. Module-level: a script reload makes new addons (this module
# stays imported), and they must still put back the real request of streams in flight.
_handoffs: dict[str, _Handoff] = {}


class FlowGate:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader
        self.last = _LastInChain(self)
        self.first = _FirstInChain(self)
        self.client_watch = ClientWatch()

    def load(self, loader) -> None:
        addons = ctx.master.addons
        addons.add(self.last, self.first)
        addons.chain.remove(self.first)
        addons.chain.insert(0, self.first)

    def done(self) -> None:
        self.client_watch.stop()
        for addon in (self.first, self.last):
            with contextlib.suppress(ValueError, exceptions.AddonManagerError):
                ctx.master.addons.remove(addon)

    async def gate_request(self, flow: http.HTTPFlow) -> None:
        runtime = self.loader.runtime
        if runtime is None or not flow.live or flow.response or flow.error:
            return
        if _passes_untouched(flow.request) or not runtime.selects(flow):
            return
        if flow.request.stream or flow.request.raw_content is None:  # its body went on already: never send it twice
            return  # (stream_large_bodies, refused while a profile is loaded: runtime.py)
        while flow.intercepted:  # let the user edit first; kill() ends the wait too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flow.wait_for_resume(), 0.5)
        if flow.error or flow.response:
            return
        await runtime.ensure_started()
        headers = list(flow.request.headers.items(multi=True))
        if not runtime.addresses_primary(flow):  # the client's credentials are for the host it addressed
            headers = [(k, v) for k, v in headers if k.lower() not in CLIENT_CREDENTIALS]
        request = LlmRequest.parse_body(flow.request.method, flow.request.path, headers, flow.request.raw_content)
        result = GateResult()
        try:
            candidates = runtime.candidates(request.api, request.payload.get("model"))
            if with_stream_decided(request).stream:
                self._gate_in_handoff(flow, runtime, request, candidates, result)
                return
            finished = await self.client_watch.run(flow, runtime.gate.run(request, candidates, result))
        except Exception:  # a bug of ours must not send the flow on unguarded: answer with an error
            logger.exception("llm-ha: the gate failed on this request")
            result = GateResult(answer=internal_error_answer())
            finished = True
        if not finished:
            _record_abandoned(flow, runtime, result)
            if flow.killable:
                flow.kill()
            return
        answer = _answer(flow, runtime, request, result)
        if isinstance(answer, Relay):
            handoff = _Handoff(flow.request.data, result, runtime, path=runtime.handoff.register(answer), parcel=answer)
            _handoffs[flow.id] = handoff
            _point_at_handoff(flow, runtime.handoff.port, handoff.path)
        else:
            headers = [(k.encode(), v.encode()) for k, v in answer.headers]
            flow.response = http.Response.make(answer.status, answer.body, headers)

    def _gate_in_handoff(self, flow: http.HTTPFlow, runtime: Runtime, request: LlmRequest,
                         candidates: list[Candidate], result: GateResult) -> None:
        """A streamed request goes on to the hand-off server at once while the gate looks for its first token:
        mitmproxy's hop to the hand-off, and its reading of the hop's head, are made during that wait
        instead of after it; the flow then waits for its answer's head in `answer_head`.
        """
        handoff = _Handoff(flow.request.data, result, runtime)
        handoff.path = runtime.handoff.reserve(handoff.stop_gate)  # first: the gate may finish at once
        handoff.gate = asyncio.create_task(self._gate_for_handoff(flow, request, candidates, handoff))
        _handoffs[flow.id] = handoff
        _point_at_handoff(flow, runtime.handoff.port, handoff.path)

    async def _gate_for_handoff(self, flow: http.HTTPFlow, request: LlmRequest, candidates: list[Candidate],
                                handoff: _Handoff) -> None:
        runtime = handoff.runtime
        try:
            await runtime.gate.run(request, candidates, handoff.result)
        except Exception:
            logger.exception("llm-ha: the gate failed on this request")
            handoff.result = GateResult(answer=internal_error_answer())
        handoff.parcel = _answer(flow, runtime, request, handoff.result)
        runtime.handoff.fulfil(handoff.path, handoff.parcel)

    # -- handed-off flows: the answer's head, and the real request back

    async def answer_head(self, flow: http.HTTPFlow) -> None:
        """The hand-off's response head only frames the body: give the flow its answer's head, once the gate
        has it (a streamed request waits here for its first token), and its real request back."""
        handoff = _handoffs.get(flow.id)
        if handoff is None:
            return
        flow.request.data = handoff.original
        if flow.response.status_code != 200:  # the hop did not know the token (410, expired): its answer stands
            return
        gate = handoff.gate
        waited = gate is None or gate.done() or await self.client_watch.run(flow, asyncio.wait([gate]))
        if not waited or handoff.parcel is None:  # the client left, the flow was killed, the gate was stopped
            if flow.killable:  # (a flow killed from the console is killed already)
                flow.kill()  # `error` stops the gate and records why
            return
        _set_answer_head(flow.response, handoff.parcel)
        _show_who_answered(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._end_handoff(flow)
        _show_who_answered(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        handoff = self._end_handoff(flow)
        if handoff:
            if handoff.parcel is None:  # the client left, or the flow was killed, before an answer
                handoff.stop_gate()
                if handoff.gate is not None:
                    await asyncio.wait([handoff.gate], timeout=GATE_STOP_S)
                _record_abandoned(flow, handoff.runtime, handoff.result)
            handoff.runtime.handoff.release(handoff.path)
        _show_who_answered(flow)

    def _end_handoff(self, flow: http.HTTPFlow) -> _Handoff | None:
        """Put the real request back and record the streamed attempt's duration (or cut) on the flow."""
        handoff = _handoffs.pop(flow.id, None)
        if handoff is None:
            return None
        flow.request.data = handoff.original
        meta = flow.metadata.get(META_KEY)
        attempts = handoff.result.attempts
        if meta and attempts:
            meta["attempts"] = [a.to_dict() for a in attempts]
            meta["upstream"] = attempts[-1].upstream
            flow.comment = meta["summary"] = summarize(meta["attempts"])
        return handoff


class _FirstInChain:
    """The hand-off's `responseheaders` hook, added at the start of mitmproxy's addon chain: every other
    addon sees the answer's head."""

    def __init__(self, gate: FlowGate) -> None:
        self.gate = gate

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        await self.gate.answer_head(flow)


class _LastInChain:
    """The gate's `request` hook, added at the end of mitmproxy's addon chain."""

    def __init__(self, gate: FlowGate) -> None:
        self.gate = gate

    async def request(self, flow: http.HTTPFlow) -> None:
        await self.gate.gate_request(flow)


def _passes_untouched(request: http.Request) -> bool:
    """What the gate cannot send itself goes through mitmproxy as it came: protocol upgrades (WebSocket,
    h2c) and CONNECT (HTTP/2 WebSockets too)."""
    return request.method == "CONNECT" or "upgrade" in request.headers


CLIENT_CHECK_S = 0.05
GATE_STOP_S = 5.0  # a stopped gate closes its attempts at once; this only bounds the wait


class ClientWatch:
    """Stops a hook's wait for the gate when the flow's client has gone away (a request for a whole
    answer is gated in the `request` hook; a streamed one waits for its answer's head in `responseheaders`).

    mitmproxy does not cancel a hook when the client leaves; it notices only once the hook returns.
    Until then the one sign is the client connection losing `CAN_READ` (its reader saw the end), so a
    timer looks at every waiting flow's client connection every `CLIENT_CHECK_S` while any waits; a
    flow killed meanwhile (from the console) stops waiting too. The wait runs in the hook's own task (no
    task of its own per request): a departed client's hook task is cancelled, and the cancellation is
    taken back (`uncancel`) once the wait has stopped, so that the hook returns normally to mitmproxy.
    HTTP/2 clients that reset one stream but keep the connection are not noticed.
    """

    def __init__(self) -> None:
        self._gated: dict[asyncio.Task, http.HTTPFlow] = {}
        self._left: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, flow: http.HTTPFlow, gate: Coroutine) -> bool:
        """Run `gate` while the client stays: True when it finished, False when the client left (it was cancelled)."""
        task = asyncio.current_task()
        if task is not None and flow.client_conn.state & ConnectionState.CAN_READ:  # else: a connection of unknown kind
            self._gated[task] = flow
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(CLIENT_CHECK_S, self._check)
        try:
            await gate
        except asyncio.CancelledError:
            if task not in self._left:  # the hook itself is cancelled (mitmproxy shuts down)
                raise
            return False
        finally:
            self._gated.pop(task, None)
            if task in self._left:
                self._left.discard(task)
                task.uncancel()
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        for task, flow in list(self._gated.items()):
            if task not in self._left and (not flow.client_conn.state & ConnectionState.CAN_READ or not flow.live):
                self._left.add(task)
                task.cancel()
        if self._gated:
            self._timer = asyncio.get_running_loop().call_later(CLIENT_CHECK_S, self._check)


def _answer(flow: http.HTTPFlow, runtime: Runtime, request: LlmRequest, result: GateResult) -> Relay | CompleteAnswer:
    """What the client gets: the stream that passed the gate or a whole answer, named on the flow."""
    attempts = [a.to_dict() for a in result.attempts]
    summary = summarize(attempts)
    if len(attempts) > 1 or result.winner is None:
        _log_flow(flow, summary)
    flow.metadata[META_KEY] = {"profile": runtime.profile.name, "upstream": result.upstream_name, "api": request.api,
                               "attempts": attempts, "summary": summary, "streamed": bool(result.stream)}
    flow.comment = summary
    extra = [("x-llm-ha-upstream", result.upstream_name), ("x-llm-ha-attempts", str(len(attempts)))]
    if result.stream:
        relay = Relay(result.stream, extra)
        protocol = request.protocol
        if protocol is not None:
            relay.follower = StreamFollower(protocol, usage_wanted=request.wants_usage, lazy=True)
            relay.resume = runtime.resumer(request, result.attempts)
        return relay
    answer = result.answer or internal_error_answer()
    return CompleteAnswer(answer.status, [*answer.headers, *extra], answer.body)


def _record_abandoned(flow: http.HTTPFlow, runtime: Runtime, result: GateResult) -> None:
    """The client left (or the flow was killed) before an answer: its attempt was closed, nothing more is tried."""
    attempts = [a.to_dict() for a in result.attempts]
    why = "killed" if flow.error and flow.error.msg == Error.KILLED_MESSAGE and flow.client_conn.connected else "client left"
    summary = " ← ".join([why, *(describe_attempt(a) for a in reversed(attempts))])
    flow.metadata[META_KEY] = {"profile": runtime.profile.name, "upstream": "none", "attempts": attempts,
                               "summary": summary, "streamed": False, "client_left": True}
    flow.comment = summary
    _log_flow(flow, summary)


def _log_flow(flow: http.HTTPFlow, what: str) -> None:
    """One line in mitmdump's own output, with the client's address as mitmproxy shows it."""
    handoff = _handoffs.get(flow.id)  # pointed at the hand-off: the client's own request is kept there
    request = handoff.original if handoff else flow.request.data
    logger.info(f"llm-ha: {request.method.decode()} {request.path.decode('utf-8', 'replace')}: {what}",
                extra={"client": flow.client_conn.peername})


def _set_answer_head(response: http.Response, parcel: Parcel) -> None:
    """`parcel`'s status, reason and headers on the flow's response, with the hand-off's framing of the body
    (chunked, or up to the close) for a stream; a whole answer is read whole and sent with its length."""
    status, reason, headers = answer_head(parcel)
    whole = not isinstance(parcel, Relay)
    framing = [(k, v) for k, v in response.headers.fields
               if k.lower() == b"connection" or (k.lower() == b"transfer-encoding" and not whole)]
    response.status_code = status
    response.reason = reason
    response.headers = http.Headers([(k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
                                     for k, v in headers] + framing)
    response.stream = not whole
    response.timestamp_start = time.time()  # the answer's head is known now, not when the hop's arrived


def _point_at_handoff(flow: http.HTTPFlow, port: int, path: str) -> None:
    """The flow's request becomes a bodiless request for `path` on the hand-off server, on a connection of
    its own (never through an upstream proxy: the hand-off server is on this machine). Its headers are
    only the hop's own: no addon sees this request (the client's is put back in `responseheaders`), and
    this is on the way to every first token, so it is made from the request's data and templates."""
    hop = copy.copy(flow.request.data)
    hop.headers = http.Headers(_hop_headers(port))
    hop.scheme, hop.authority, hop.host, hop.port, hop.path = b"http", b"", "127.0.0.1", port, path.encode()
    hop.content, hop.trailers = b"", None
    flow.request.data = hop
    flow.server_conn = copy.copy(_hop_server(port))  # a spec mitmproxy connects by (or reuses a connection for)


@functools.lru_cache(maxsize=8)
def _hop_headers(port: int) -> tuple[tuple[bytes, bytes], ...]:
    return (b"host", b"127.0.0.1:%d" % port), (b"content-length", b"0")


@functools.lru_cache(maxsize=8)
def _hop_server(port: int) -> connection.Server:
    return connection.Server(address=("127.0.0.1", port))


# -- who answered, as the flow list shows it

FAILED_OVER_MARKER = ":default:"  # mitmproxy's plain mark: `~marked` lists the flows that failed over


def summarize(attempts: Sequence[dict]) -> str:
    """Who answered first, then the attempts that failed before it, latest first (the flow's comment):
    `primary 83ms`, `fallback 83ms ← primary timeout 200ms`, `none ← fallback http_error 500 ← primary timeout 200ms`.
    """
    if not attempts:
        return "none ← no upstream node to try"
    *before, last = attempts
    lead = _who_answered(last) if answered(last) else f"none ← {describe_attempt(last)}"
    return " ← ".join([lead, *(describe_attempt(a) for a in reversed(before))])


def answered(attempt: dict) -> bool:
    """The client got this attempt's answer, or the start of it."""
    return attempt["outcome"] in _ANSWERS or attempt.get("events") is not None  # events: it broke later


_ANSWERS = (Outcome.OK, Outcome.CLIENT_ERROR, Outcome.STREAM_CUT)


def _who_answered(attempt: dict) -> str:
    if attempt["outcome"] != Outcome.OK or attempt.get("events") is not None:
        return describe_attempt(attempt)  # `primary client_error 400`, `primary ok 80ms, stream_cut after 41 events`
    ttfb = attempt.get("ttfb_s")
    words = (attempt["upstream"], "resumed" if attempt.get("resumed") else "",
             f"{ttfb * 1000:.0f}ms" if ttfb is not None else "")
    return " ".join(w for w in words if w)


def _show_who_answered(flow: http.HTTPFlow) -> None:
    """Mark a flow that failed over, and name the node that answered as its server."""
    meta = flow.metadata.get(META_KEY)
    if not meta or not meta.get("attempts"):
        return
    attempts = meta["attempts"]
    if len(attempts) > 1 and not flow.marked:
        flow.marked = FAILED_OVER_MARKER
    if answered(attempts[-1]):
        _name_server(flow, attempts[-1]["node"])


def _name_server(flow: http.HTTPFlow, node_url: str) -> None:
    """Show and record `node_url` as the flow's server instead of the hand-off server (or the reverse target).

    On a copy: the proxy keeps using its own connection object, and would reuse a connection whose
    address said the node's for the node's next requests.
    """
    address = _address_of(node_url)
    if flow.server_conn.address == address:
        return
    shown = copy.copy(flow.server_conn)
    # Past `Server.__setattr__`, which refuses a new address on an open connection: this copy is never connected.
    shown.__dict__["address"] = shown.__dict__["peername"] = address  # for a host name, the name stands for the IP
    flow.server_conn = shown


@functools.lru_cache(maxsize=256)
def _address_of(node_url: str) -> tuple[str, int]:
    url = urlsplit(node_url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
