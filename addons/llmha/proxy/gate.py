"""The failover gate: try candidates in order until one answers in time, before the client sees a byte.

For each candidate the gate first takes a lease on the node (`core/nodes.py`); a node at its limit
refuses it and the next candidate is asked (a "shed", not an attempt). If every candidate refuses,
the request is not failed: they are asked again past their limits, in the same order (queueing
somewhere beats failing). Without `transparent_failover` a request makes at most one attempt.

A non-streaming chat completion is asked of the upstream as a stream and assembled into the
`chat.completion` the client expects (`assembles`, `core/assemble.py`), so that its first token is
gated like a streaming request's and a hanging primary costs `first_byte_timeout`, not
`request_timeout`.

An attempt fails on a connection error, a reset before the first byte, a late first token (no SSE data
event within `first_byte_timeout`; for other requests: no complete answer within `request_timeout`),
HTTP 5xx or 429, a first SSE event that is an error object, or a 2xx that is no answer: an HTML page, a
JSON error object, JSON cut short, an assembled stream that ends before its end. A failed attempt is
closed at once, so an overloaded server can drop the work, and the next candidate is tried. A
streaming attempt that passes leaves the gate as an `OpenStream` holding its lease, its first event
already read; anything else leaves as a `CompleteAnswer`, its lease released.

With `hedge_after` (off by default) an attempt still without a first token by then is joined by the
next candidate that has room, and the first to answer wins (`_race`); the others are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from ..core.assemble import CompletionAssembler
from ..core.candidates import Candidate
from ..core.nodes import Lease, Leases
from ..core.profile import Upstream
from ..core.retry import RetryDiscipline
from ..core.splice import Answer, StreamFollower, StreamProtocol, api_of, protocol_for
from ..core.sse import error_in, event_data, split_events
from ..core.types import AttemptRecord, Outcome, describe_attempt, status_outcome
from .upstream import ConnectFailed, Headers, UpstreamClient, UpstreamResponse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
              "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
# What identifies or authorizes the client: replaced by an upstream's own key, never sent to a fallback.
CLIENT_CREDENTIALS = {"authorization", "api-key", "x-api-key", "x-goog-api-key", "cookie", "openai-organization",
                      "openai-project"}
# All a fallback provider gets of the client's headers: what describes the request, nothing about the client.
FALLBACK_HEADERS = {"accept", "accept-language", "content-type", "user-agent", "openai-beta", "anthropic-version",
                    "anthropic-beta", "traceparent", "tracestate", "x-request-id"}
FALLBACK_HEADER_PREFIXES = ("x-stainless-",)  # the OpenAI SDKs' client description
_NEVER_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
MAX_FIRST_EVENT_BYTES = 1 << 20


@dataclass
class LlmRequest:
    """What the client asked, independent of mitmproxy."""

    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes
    payload: dict  # the JSON body, parsed once; {} when the body is not a JSON object
    continuing: Answer | None = None  # a continuation: the answer the client has so far

    @classmethod
    def parse_body(cls, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> LlmRequest:
        return cls(method, path, headers, body, _json_body(body))

    @property
    def wants_usage(self) -> bool:
        options = self.payload.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    @functools.cached_property
    def protocol(self) -> StreamProtocol | None:
        return protocol_for(self.path, self.payload)

    def continued(self, answer: Answer) -> LlmRequest:
        """The request for the rest of `answer`, in the form each upstream's `resume` names."""
        return LlmRequest(self.method, self.path, self.headers, self.body, self.payload, continuing=answer)

    @property
    def stream(self) -> bool:
        protocol = self.protocol
        return protocol.streams(self.payload) if protocol is not None else self.payload.get("stream") is True

    @functools.cached_property
    def api(self) -> str | None:
        """The API the request speaks, as upstreams' `protocols` name it; None: unknown traffic."""
        return api_of(self.path, self.payload)

    def body_for(self, upstream: Upstream) -> bytes:
        """The body for this upstream: its `model` in place of the client's, the continuation's prefill."""
        payload = self.payload
        protocol = self.protocol
        if self.continuing is not None and protocol is not None:
            payload = protocol.continuation_body(payload, self.continuing, upstream.resume)
        elif upstream.model is None or "model" not in payload:
            return self.body
        if upstream.model is not None and "model" in payload:
            payload = {**payload, "model": upstream.model}
        return json.dumps(payload, ensure_ascii=False).encode()


@dataclass
class CompleteAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class OpenStream:
    """A streaming answer that passed the gate; `chunks()` yields it from its first byte on.

    It holds its attempt's lease until `close` releases it with the stream's outcome.
    """

    status: int
    headers: list[tuple[str, str]]
    candidate: Candidate
    record: AttemptRecord
    lease: Lease
    response: UpstreamResponse
    head: list[bytes]
    rest: AsyncIterator[bytes]
    started_monotonic: float
    clock: Callable[[], float] = time.time
    reason: bytes = b""  # the upstream's reason phrase, passed on
    released: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.head:
            yield chunk
        async for chunk in self.rest:
            yield chunk

    def mark_delivered(self) -> None:
        """The client has the whole answer from this stream: its duration ends now."""
        if self.record.duration_s is None:
            self.record.duration_s = time.monotonic() - self.started_monotonic

    def finish(self, outcome: Outcome) -> None:
        """End the attempt: release the lease (once) with `outcome`, then close the upstream response."""
        if not self.released:
            self.released = True
            self.mark_delivered()
            if outcome.failed:
                self.record.outcome = outcome.value
            self.lease.release(outcome, self.clock())
        self.response.finish()


@dataclass
class GateResult:
    attempts: list[AttemptRecord] = field(default_factory=list)
    winner: Candidate | None = None
    answer: CompleteAnswer | None = None
    stream: OpenStream | None = None
    retry_after_s: float | None = None  # the shortest `Retry-After` of the 429s met
    declined: CompleteAnswer | None = None  # the last 4xx an upstream's `failover_on` moved on from

    @property
    def upstream_name(self) -> str:
        return self.winner.upstream.name if self.winner else "none"

    def note_retry_after(self, seconds: float | None) -> None:
        if seconds is not None and (self.retry_after_s is None or seconds < self.retry_after_s):
            self.retry_after_s = seconds


class _AttemptFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


FailoverListener = Callable[[Candidate, Candidate, AttemptRecord], None]


@dataclass
class _Racer:
    """One attempt of a hedged run, with its own result until it is judged."""

    candidate: Candidate
    own: GateResult
    task: asyncio.Future[tuple[AttemptRecord, Outcome]]
    started: float  # time.monotonic()

    def hedge_in(self) -> float | None:
        """Seconds until this attempt is due a hedge (None: its upstream does not hedge)."""
        after = self.candidate.upstream.hedge_after
        return None if after is None else max(0.0, after - (time.monotonic() - self.started))

    def merge_into(self, result: GateResult, outcome: Outcome) -> None:
        result.note_retry_after(self.own.retry_after_s)
        result.declined = self.own.declined or result.declined
        if outcome in _ANSWERED:
            result.stream, result.answer = self.own.stream, self.own.answer


async def _close_losers(racing: list[_Racer]) -> None:
    """Stop the attempts that lost the race: each releases its lease as CANCELLED (one already through its
    first token, as its stream is closed)."""
    for racer in racing:
        racer.task.cancel()
    await asyncio.gather(*(r.task for r in racing), return_exceptions=True)
    for racer in racing:
        if racer.own.stream is not None and not racer.own.stream.released:
            racer.own.stream.finish(Outcome.CANCELLED)


_ANSWERED = {Outcome.OK, Outcome.CLIENT_ERROR}  # the attempt's answer goes to the client


@dataclass
class _Run:
    """One request's way through the candidates."""

    started: float
    tries: Counter[str] = field(default_factory=Counter)  # attempts per upstream
    over_budget: set[str] = field(default_factory=set)  # upstreams whose retry budget refused this request
    paced: list[Candidate] = field(default_factory=list)  # passed over for their `Retry-After`
    failed: tuple[Candidate, AttemptRecord] | None = None
    deadline_passed: bool = False

    def time_left(self, upstream: Upstream, now: float) -> float | None:
        if upstream.request_deadline is None:
            return None
        return upstream.request_deadline - (now - self.started)


class Gate:
    def __init__(self, leases: Leases, client: UpstreamClient, clock: Callable[[], float] = time.time,
                 on_failover: FailoverListener | None = None, max_attempts: int | None = None,
                 retry: RetryDiscipline | None = None) -> None:
        self.leases = leases
        self.retry = retry or RetryDiscipline()
        self.client = client
        self.clock = clock
        self.on_failover = on_failover
        self.max_attempts = max_attempts  # None: as many as there are candidates

    async def run(self, request: LlmRequest, candidates: list[Candidate],
                  result: GateResult | None = None) -> GateResult:
        """Try `candidates`; `result`, when given, holds every attempt as it starts (kept if the run is cancelled).

        Retry discipline (`core/retry.py`): a node paced by its `Retry-After` is passed over, and if it
        is all that is left, waited for up to `retry_after_max`; an upstream's attempts past a request's
        first need its retry budget and stay under its `max_attempts_per_upstream`; no attempt starts
        past the upstream's `request_deadline`, counted from the start of the run.
        """
        result = GateResult() if result is None else result
        request = with_stream_decided(request)
        run = _Run(started=self.clock())
        for over_limit in (False, True):
            if await self._walk(request, candidates, result, run, over_limit):
                return result
            if result.attempts:
                break  # someone had room: the past-the-limit pass is only for when nobody had
        if await self._wait_for_paced(request, result, run):
            return result
        result.answer = in_dialect(self._failure(result, run), request.api)
        return result

    async def _walk(self, request: LlmRequest, candidates: list[Candidate], result: GateResult, run: _Run,
                    over_limit: bool) -> bool:
        """The candidates in order, each when the one before failed: True when one answered."""
        if not over_limit and self._hedges(request, candidates):
            return await self._race(request, iter(candidates), result, run)
        for candidate in candidates:
            if self._out_of_attempts(result):
                break
            if await self._try(request, candidate, result, run, over_limit):
                return True
        return False

    def _out_of_attempts(self, result: GateResult) -> bool:
        return self.max_attempts is not None and len(result.attempts) >= self.max_attempts

    async def _try(self, request: LlmRequest, candidate: Candidate, result: GateResult, run: _Run,
                   over_limit: bool) -> bool:
        """One candidate, if the discipline lets it be tried now: True when it answered (the run is over)."""
        admitted = await self._admit(request, candidate, run, over_limit)
        if admitted is None:
            return False
        lease, time_left = admitted
        record, outcome = await self._attempt(request, candidate, lease, result, time_left)
        return self._judge(candidate, record, outcome, result, run)

    async def _admit(self, request: LlmRequest, candidate: Candidate, run: _Run, over_limit: bool,
                     hedge: bool = False) -> tuple[Lease, float | None] | None:
        """The lease for an attempt on `candidate` and the attempt's share of the deadline, if the
        discipline lets it be tried now and it has room; None: passed over."""
        upstream, now = candidate.upstream, self.clock()
        budget = self.retry.budget(upstream.name)
        tried_here = run.tries[upstream.name]
        if not self.retry.pacing.ready(candidate.health, now):
            run.paced.append(candidate)
            return None
        if upstream.name in run.over_budget or tried_here >= upstream.max_attempts:
            return None
        time_left = run.time_left(upstream, now)
        if time_left is not None and time_left <= 0:
            run.deadline_passed = True
            return None
        if tried_here and budget is not None and not budget.allows_retry(now):
            run.over_budget.add(upstream.name)  # straight on to the next upstream
            return None
        lease = await self.leases.acquire(candidate.node, now, streamed=request.stream or assembles(request),
                                          over_limit=over_limit, health=candidate.health)
        if lease is None:
            return None
        if budget is not None and tried_here:
            budget.retried(now)
        elif budget is not None:
            budget.request(now)
        run.tries[upstream.name] += 1
        if run.failed and self.on_failover and not hedge:
            self.on_failover(run.failed[0], candidate, run.failed[1])
        return lease, time_left

    def _judge(self, candidate: Candidate, record: AttemptRecord, outcome: Outcome, result: GateResult,
               run: _Run) -> bool:
        """An attempt's end, for the run: True when it answered (the run is over)."""
        if outcome in _ANSWERED:
            result.winner = candidate
            return True
        run.failed = (candidate, record)
        if not self.retry.pacing.ready(candidate.health, self.clock()):
            run.paced.append(candidate)  # its Retry-After: waited for if nobody else answers
        if outcome is Outcome.CANCELLED:
            run.deadline_passed = True  # cut by the deadline, not by the node
        return False

    # -- hedging

    def _hedges(self, request: LlmRequest, candidates: list[Candidate]) -> bool:
        """Hedging applies to requests gated on their first token, when some upstream has `hedge_after`."""
        gated = request.stream or assembles(request)
        return gated and self.max_attempts != 1 and any(c.upstream.hedge_after is not None for c in candidates)

    async def _race(self, request: LlmRequest, waiting: Iterator[Candidate], result: GateResult, run: _Run) -> bool:
        """The candidates in order, with hedging: an attempt without a first token after its upstream's
        `hedge_after` is joined by the next candidate that has room (under its limit, within the retry
        discipline), without being stopped. The first to answer wins; the others are closed at once and
        released as CANCELLED: losing a race says nothing about a node. An attempt that fails before
        the winner answers (its own first-byte timeout, an error) counts as usual; if no other attempt
        is running, the next candidate starts as it would without hedging.
        """
        racing: list[_Racer] = []
        hedge_due = exhausted = False
        try:
            while True:
                if not racing or (hedge_due and not exhausted):
                    racer = await self._start_next(request, waiting, result, run, hedge=bool(racing))
                    if racer is None and not racing:
                        return False
                    exhausted = racer is None
                    racing += [racer] if racer is not None else []
                timer = None if exhausted else racing[-1].hedge_in()
                done, _ = await asyncio.wait([r.task for r in racing], timeout=timer,
                                             return_when=asyncio.FIRST_COMPLETED)
                hedge_due = not done
                for racer in [r for r in racing if r.task in done]:
                    racing.remove(racer)
                    record, outcome = racer.task.result()
                    racer.merge_into(result, outcome)
                    if self._judge(racer.candidate, record, outcome, result, run):
                        return True
        finally:
            await _close_losers(racing)

    async def _start_next(self, request: LlmRequest, waiting: Iterator[Candidate], result: GateResult, run: _Run,
                          hedge: bool) -> _Racer | None:
        """An attempt on the next candidate that may be tried now; None when none is left."""
        for candidate in waiting:
            if self._out_of_attempts(result):
                return None
            admitted = await self._admit(request, candidate, run, over_limit=False, hedge=hedge)
            if admitted is not None:
                lease, time_left = admitted
                own = GateResult(attempts=result.attempts)  # shared: every attempt is the flow's as it starts
                task = asyncio.ensure_future(self._attempt(request, candidate, lease, own, time_left, hedge))
                return _Racer(candidate, own, task, time.monotonic())
        return None

    async def _wait_for_paced(self, request: LlmRequest, result: GateResult, run: _Run) -> bool:
        """Nobody else could answer: wait for the paced node free soonest, if within `retry_after_max`."""
        out_of_attempts = self.max_attempts is not None and len(result.attempts) >= self.max_attempts
        if not run.paced or run.deadline_passed or out_of_attempts:
            return False
        now = self.clock()
        soonest = min(run.paced, key=lambda c: self.retry.pacing.wait_s(c.health, now))
        wait = self.retry.pacing.wait_s(soonest.health, now)
        result.note_retry_after(wait)
        time_left = run.time_left(soonest.upstream, now)
        if wait > self.retry.retry_after_max or (time_left is not None and wait >= time_left):
            return False
        await asyncio.sleep(wait)
        run.paced = []
        return await self._try(request, soonest, result, run, over_limit=True)

    def _failure(self, result: GateResult, run: _Run) -> CompleteAnswer:
        last = result.attempts[-1] if result.attempts else None
        if last is not None and last.outcome == Outcome.DECLINED and result.declined is not None:
            result.winner = run.failed[0] if run.failed else None
            return result.declined  # no upstream left to move on to: the client gets the 4xx
        if run.deadline_passed:
            return deadline_answer(result.attempts)
        if run.paced and all(a.outcome == Outcome.RATE_LIMITED for a in result.attempts):
            return _rate_limited_answer(result.attempts, result.retry_after_s)
        return failure_answer(result.attempts, result.retry_after_s)

    async def _attempt(self, request: LlmRequest, candidate: Candidate, lease: Lease, result: GateResult,
                       time_left: float | None = None, hedge: bool = False) -> tuple[AttemptRecord, Outcome]:
        upstream, node = candidate.upstream, candidate.node
        assembled = assembles(request)
        sent = streamed_form(request) if assembled else request
        own_limit = upstream.first_byte_timeout if sent.stream else upstream.request_timeout
        limit = own_limit if time_left is None else min(own_limit, time_left)
        record = AttemptRecord(upstream=upstream.name, node=node.url, start=self.clock(), timeout_s=limit, hedge=hedge)
        result.attempts.append(record)
        started = time.monotonic()
        headers, body = upstream_headers(sent.headers, candidate), sent.body_for(upstream)
        response: UpstreamResponse | None = None
        outcome = Outcome.CANCELLED  # until known: an exception or cancellation is not the node's fault
        try:
            async with asyncio.timeout(limit) as deadline:
                response = await self.client.send(sent.method, node.url + sent.path, headers, body)
                record.status = response.status_code
                verdict = status_outcome(response.status_code)
                self._note_pacing(response, candidate, result)
                if verdict.failed:
                    raise _AttemptFailed(verdict)
                if verdict is Outcome.CLIENT_ERROR and upstream.failover_on:
                    record.ttfb_s = time.monotonic() - started
                    await self._decline_listed_error(response, upstream, result)
                passed = response.status_code < 300
                if passed and _is_html(response.headers):
                    raise _AttemptFailed(Outcome.INVALID_ANSWER)
                if passed and assembled and _is_event_stream(response.headers):
                    result.answer = await self._assemble(response, upstream, record, started, deadline)
                elif passed and (sent.stream or _is_event_stream(response.headers)):
                    opened = await self._open_stream(response, candidate, lease, record, started, sent.protocol)
                    if isinstance(opened, OpenStream):
                        result.stream = opened
                    else:
                        result.answer = judge_answer(opened)
                else:
                    record.ttfb_s = time.monotonic() - started
                    body = await response.aread()  # decoded: the client gets it without content-encoding
                    result.answer = judge_answer(CompleteAnswer(response.status_code, response_headers(response), body))
                outcome = verdict
        except _AttemptFailed as failure:
            outcome = failure.outcome
        except TimeoutError:  # after an assembled stream's first token, the idle limit may be what ran out
            stalled = assembled and record.ttfb_s is not None and record.timeout_s != upstream.request_timeout
            cut_by_deadline = record.ttfb_s is None and limit < own_limit
            # The request's deadline, not the node, cut it short: nothing to count against the node.
            outcome = Outcome.CANCELLED if cut_by_deadline else Outcome.STALLED if stalled else Outcome.TIMEOUT
        except ConnectFailed:
            outcome = Outcome.CONNECT_ERROR
        except OSError:
            outcome = Outcome.RESET
        finally:
            record.outcome = outcome.value
            if result.stream is not None and result.stream.lease is lease:
                lease.first_byte(record.ttfb_s, self.clock())
            else:
                record.duration_s = time.monotonic() - started
                lease.release(outcome, self.clock(), record.ttfb_s)
                if response is not None:
                    await response.aclose()
        return record, outcome

    def _note_pacing(self, response: UpstreamResponse, candidate: Candidate, result: GateResult) -> None:
        """A 429 or 503 with `Retry-After`: the node is not tried again before then (not an ejection)."""
        if response.status_code not in (429, 503):
            return
        wait = retry_after_s(response.headers, self.clock())
        if response.status_code == 429:
            result.note_retry_after(wait)
        if wait:
            self.retry.pacing.note(candidate.health, wait, self.clock())

    async def _decline_listed_error(self, response: UpstreamResponse, upstream: Upstream, result: GateResult) -> None:
        """A 4xx whose error code (or type) the upstream's `failover_on` lists moves the request on."""
        body = await response.aread()
        if _error_code(body) & set(upstream.failover_on):
            result.declined = CompleteAnswer(response.status_code, response_headers(response), body)
            raise _AttemptFailed(Outcome.DECLINED)
        result.answer = CompleteAnswer(response.status_code, response_headers(response), body)
        raise _AttemptFailed(Outcome.CLIENT_ERROR)

    async def _assemble(self, response: UpstreamResponse, upstream: Upstream, record: AttemptRecord,
                        started: float, deadline: asyncio.Timeout) -> CompleteAnswer:
        """Read the stream asked for on behalf of a non-streaming client into one `chat.completion`.

        Its first data event must come within `first_byte_timeout` (the deadline as entered); from then
        on the whole answer has until `request_timeout` after the attempt started, and at most
        `stream_idle_timeout` between two events. The client has seen nothing yet, so a stream that
        breaks, stalls or errs on the way fails this attempt, not the request.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + upstream.request_timeout - (time.monotonic() - started)
        assembler = CompletionAssembler()
        async for chunk in response.aiter_bytes():
            if not assembler.feed(chunk):
                continue  # keep-alive comments are no progress
            if record.ttfb_s is None:
                record.ttfb_s = time.monotonic() - started
            if assembler.error is not None:
                raise _AttemptFailed(Outcome.IN_BAND_ERROR)
            if assembler.done:
                break  # `[DONE]`: whatever follows (a connection kept open) is not part of the answer
            idle_end = loop.time() + upstream.stream_idle_timeout
            record.timeout_s = upstream.stream_idle_timeout if idle_end < end else upstream.request_timeout
            deadline.reschedule(min(idle_end, end))
        assembler.finish()
        if assembler.error is not None:
            raise _AttemptFailed(Outcome.IN_BAND_ERROR)
        if not assembler.complete:
            raise _AttemptFailed(Outcome.TRUNCATED)
        headers = [(k, v) for k, v in response_headers(response) if k.lower() != "content-type"]
        body = json.dumps(assembler.completion(), ensure_ascii=False).encode()
        return CompleteAnswer(response.status_code, [*headers, ("content-type", "application/json")], body)

    async def _open_stream(self, response: UpstreamResponse, candidate: Candidate, lease: Lease,
                           record: AttemptRecord, started: float,
                           protocol: StreamProtocol | None = None) -> OpenStream | CompleteAnswer:
        """Read up to the first token: the stream that passed, or a whole answer without events.

        The first token is the first SSE data event, or, for a protocol llm-ha follows, what that
        protocol counts as one (Anthropic's `message_start` and pings or Responses' `response.created`
        come before any token and pass nothing); an in-band error before it fails the attempt. The body
        is read decoded: a stream the upstream compressed although asked for `identity` is gated on its
        events all the same, and the client gets it without `content-encoding`.
        """
        rest = response.aiter_bytes()
        head: list[bytes] = []
        buffer = b""
        follower = StreamFollower(protocol, lazy=not protocol.opens_before_content) if protocol is not None else None
        async for chunk in rest:
            if record.ttfb_s is None:
                record.ttfb_s = time.monotonic() - started
            head.append(chunk)
            if follower is not None:
                follower.feed(chunk)
                if follower.failed:
                    raise _AttemptFailed(Outcome.IN_BAND_ERROR)
                passed, waiting = follower.started, follower.pending
            else:
                events, buffer = split_events(buffer + chunk)
                first = next((d for d in map(event_data, events) if d is not None), None)
                if first is not None and error_in(first):
                    raise _AttemptFailed(Outcome.IN_BAND_ERROR)
                passed, waiting = first is not None, len(buffer)
            if passed or waiting > MAX_FIRST_EVENT_BYTES:
                return OpenStream(response.status_code, response_headers(response), candidate, record, lease,
                                  response, head, rest, started, self.clock,
                                  reason=response.reason_phrase.encode("latin-1", "replace"))
        if not head:
            raise _AttemptFailed(Outcome.RESET)
        # The server ended without an SSE event (it answered a stream request with plain JSON): pass it on.
        return CompleteAnswer(response.status_code, response_headers(response), b"".join(head))


def upstream_headers(client_headers: list[tuple[str, str]], candidate: Candidate) -> list[tuple[str, str]]:
    """The client's headers, fit for this upstream.

    The primary is the server the client addresses: it gets the client's headers, but not the client's
    credentials when the profile gives it a key of its own. A fallback provider gets only headers that
    describe the request (`FALLBACK_HEADERS`): never the client's credentials, cookies or account ids.
    """
    api_key = candidate.upstream.api_key
    if candidate.is_primary:
        headers = [(k, v) for k, v in client_headers
                   if k.lower() not in _NEVER_FORWARDED and (api_key is None or k.lower() not in CLIENT_CREDENTIALS)]
    else:
        headers = [(k, v) for k, v in client_headers if _meant_for_any_provider(k.lower())]
    headers.append(("accept-encoding", "identity"))  # the gate reads the first SSE event
    if api_key:
        headers.append(_auth_header(candidate.upstream.auth, api_key))
    return headers


def _auth_header(auth: str, api_key: str) -> tuple[str, str]:
    """How the upstream's `auth` sends its key: OpenAI's bearer token, Anthropic's or Azure's header."""
    if auth == "bearer":
        return "authorization", f"Bearer {api_key}"
    return auth, api_key  # "x-api-key" (Anthropic), "api-key" (Azure OpenAI)


def _meant_for_any_provider(name: str) -> bool:
    return name in FALLBACK_HEADERS or name.startswith(FALLBACK_HEADER_PREFIXES)


def response_headers(response: UpstreamResponse) -> list[tuple[str, str]]:
    """The upstream's headers for the client; the body it gets is always decoded (no content-encoding)."""
    return [(k, v) for k, v in response.headers.multi_items()
            if k.lower() not in HOP_BY_HOP | {"content-length", "content-encoding"}]


def _json_body(body: bytes) -> dict:
    if not body or body.lstrip()[:1] != b"{":
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


_UPSTREAM_ANSWERED = {Outcome.HTTP_ERROR, Outcome.RATE_LIMITED, Outcome.IN_BAND_ERROR, Outcome.RESET,
                      Outcome.INVALID_ANSWER, Outcome.TRUNCATED}


def failure_answer(attempts: list[AttemptRecord], retry_after: float | None = None) -> CompleteAnswer:
    """The OpenAI-style error for a request that no candidate could serve.

    When every attempt was rate-limited the client is told so: a 429 with the shortest `Retry-After`
    the upstreams gave (`retry_after`, seconds), so that it backs off as it would from the provider.
    """
    outcomes = {Outcome(a.outcome) for a in attempts}
    if outcomes == {Outcome.RATE_LIMITED}:
        return _rate_limited_answer(attempts, retry_after)
    if outcomes & _UPSTREAM_ANSWERED:
        status, kind, code = 502, "upstream_error", "all_upstreams_failed"
    elif Outcome.TIMEOUT in outcomes:
        status, kind, code = 504, "timeout", "upstream_timeout"
    else:
        status, kind, code = 503, "service_unavailable", "no_upstream_available"
    tried = "; ".join(describe_attempt(a) for a in attempts) or "no upstream node to try"
    message = f"llm-ha: no upstream could answer ({len(attempts)} attempts: {tried})"
    body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
    return CompleteAnswer(status, [("content-type", "application/json")], body)


_ANTHROPIC_ERROR_TYPES = {429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def in_dialect(answer: CompleteAnswer, api: str | None) -> CompleteAnswer:
    """llm-ha's own error (OpenAI-shaped) in the shape the client's API uses: Anthropic's
    `{"type": "error", "error": {"type", "message"}}`, Ollama's `{"error": "..."}`."""
    if api not in ("anthropic", "ollama") or answer.status < 400:
        return answer
    error = _json_body(answer.body).get("error")
    if not isinstance(error, dict) or not str(error.get("message", "")).startswith("llm-ha:"):
        return answer  # an upstream's own error, passed on as it came
    if api == "ollama":
        body = {"error": error["message"]}
    else:
        kind = _ANTHROPIC_ERROR_TYPES.get(answer.status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": error["message"]}}
    return CompleteAnswer(answer.status, answer.headers, json.dumps(body).encode())


def deadline_answer(attempts: list[AttemptRecord]) -> CompleteAnswer:
    """The 504 of a request whose `request_deadline` passed before any upstream's first byte."""
    tried = "; ".join(describe_attempt(a) for a in attempts) or "no attempt started in time"
    message = f"llm-ha: request_deadline passed before any upstream answered ({len(attempts)} attempts: {tried})"
    body = json.dumps({"error": {"message": message, "type": "timeout", "code": "request_deadline_exceeded"}}).encode()
    return CompleteAnswer(504, [("content-type", "application/json")], body)


def _error_code(body: bytes) -> set[str]:
    """An OpenAI-style error's `code` and `type` (what `failover_on` may list)."""
    error = _json_body(body).get("error")
    if not isinstance(error, dict):
        return set()
    return {str(error[k]) for k in ("code", "type") if error.get(k) is not None}


def _rate_limited_answer(attempts: list[AttemptRecord], retry_after: float | None) -> CompleteAnswer:
    tried = "; ".join(describe_attempt(a) for a in attempts)
    message = f"llm-ha: every upstream is rate-limiting this request ({len(attempts)} attempts: {tried})"
    body = json.dumps({"error": {"message": message, "type": "rate_limit_error", "code": "rate_limited"}}).encode()
    headers = [("content-type", "application/json")]
    if retry_after is not None:
        headers += [("retry-after", str(math.ceil(retry_after))), ("retry-after-ms", str(math.ceil(retry_after * 1000)))]
    return CompleteAnswer(429, headers, body)


def retry_after_s(headers: Headers, now: float) -> float | None:
    """How long a 429 asks to wait: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an HTTP date."""
    with contextlib.suppress(ValueError):
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now) if when.tzinfo else None


# -- what the upstream is asked, and how its answer is judged

_LAX_TRUE = {"true", "yes", "y", "on", "t", "1"}
_LAX_FALSE = {"false", "no", "n", "off", "f", "0"}


def stream_flag(value: object) -> bool | None:
    """`stream` as a lax server reads it (pydantic, as vLLM and SGLang parse requests); None: as no boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        return True if word in _LAX_TRUE else False if word in _LAX_FALSE else None
    return None


def with_stream_decided(request: LlmRequest) -> LlmRequest:
    """The request with `stream` as a JSON boolean, so that what the gate expects is what the upstream does.

    `"stream": "yes"` streams on a lax server and is refused by a strict one; sent as `true`, it
    streams on both, and the gate gates it as a stream.
    """
    value = request.payload.get("stream")
    flag = stream_flag(value)
    if "stream" not in request.payload or isinstance(value, bool) or flag is None:
        return request
    return _with_payload(request, {**request.payload, "stream": flag})


def assembles(request: LlmRequest) -> bool:
    """A non-streaming chat completion: asked of the upstream as a stream and assembled (`core/assemble.py`)."""
    return (request.method == "POST" and not request.stream and request.continuing is None
            and request.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions")
            and isinstance(request.payload.get("messages"), list))


def streamed_form(request: LlmRequest) -> LlmRequest:
    """The streaming request for a non-streaming client's: its first token can be gated, usage still comes."""
    options = request.payload.get("stream_options")
    options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _with_payload(request, {**request.payload, "stream": True, "stream_options": options})


def _with_payload(request: LlmRequest, payload: dict) -> LlmRequest:
    return dataclasses.replace(request, payload=payload, body=json.dumps(payload, ensure_ascii=False).encode())


def judge_answer(answer: CompleteAnswer) -> CompleteAnswer:
    """A 2xx JSON answer that is an error object, or JSON cut short, fails the attempt; others pass as they are."""
    if not 200 <= answer.status < 300 or answer.status == 204:
        return answer
    content_type = next((v for k, v in answer.headers if k.lower() == "content-type"), "")
    looks_json = "json" in content_type.lower() or (not content_type and answer.body.lstrip()[:1] in (b"{", b"["))
    if not looks_json:
        return answer
    try:
        payload = json.loads(answer.body)
    except ValueError:
        raise _AttemptFailed(Outcome.TRUNCATED) from None
    if isinstance(payload, dict) and payload.get("error") is not None:
        raise _AttemptFailed(Outcome.IN_BAND_ERROR)
    return answer


def _is_html(headers: Headers) -> bool:
    return headers.get("content-type", "").lower().startswith("text/html")


def _is_event_stream(headers: Headers) -> bool:
    return headers.get("content-type", "").lower().startswith("text/event-stream")


def internal_error_answer() -> CompleteAnswer:
    body = {"error": {"message": "llm-ha: internal error, see the proxy's log", "type": "internal_error",
                      "code": "llm_ha_internal_error"}}
    return CompleteAnswer(502, [("content-type", "application/json")], json.dumps(body).encode())
