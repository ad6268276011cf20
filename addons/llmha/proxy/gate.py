"""The failover gate: try candidates in order until one answers in time, before the client sees a byte.

For each candidate the gate first takes a lease on the node (`core/nodes.py`); a node at its limit
refuses it and the next candidate is asked (a "shed", not an attempt). If every candidate refuses,
the request is not failed: they are asked again past their limits, in the same order (queueing
somewhere beats failing). Without `transparent_failover` a request makes at most one attempt.

An attempt fails on a connection error, a reset before the first byte, a late first token (streaming:
no SSE data event within `first_byte_timeout`; otherwise: no complete answer within
`request_timeout`), HTTP 5xx or 429, or a first SSE event that is an error object. A failed attempt
is closed at once, so an overloaded server can drop the work, and the next candidate is tried. A
streaming attempt that passes leaves the gate as an `OpenStream` holding its lease, its first event
already read; anything else leaves as a `CompleteAnswer`, its lease released.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from ..core.candidates import Candidate
from ..core.nodes import Lease, Leases
from ..core.sse import error_in, event_data, split_events
from ..core.types import AttemptRecord, Outcome, describe_attempt, status_outcome

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
              "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
CLIENT_CREDENTIALS = {"authorization", "api-key", "x-api-key"}
MAX_FIRST_EVENT_BYTES = 1 << 20


@dataclass
class LlmRequest:
    """What the client asked, independent of mitmproxy."""

    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes
    payload: dict  # the JSON body, parsed once; {} when the body is not a JSON object

    @classmethod
    def parse_body(cls, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> LlmRequest:
        return cls(method, path, headers, body, _json_body(body))

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True

    def body_for(self, model: str | None) -> bytes:
        """The body with `model` replaced, when the upstream names one and the request has a model."""
        if model is None or "model" not in self.payload:
            return self.body
        return json.dumps({**self.payload, "model": model}, ensure_ascii=False).encode()


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
    response: httpx.Response
    head: list[bytes]
    rest: AsyncIterator[bytes]
    started_monotonic: float
    clock: Callable[[], float] = time.time
    released: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.head:
            yield chunk
        async for chunk in self.rest:
            yield chunk

    async def close(self, outcome: Outcome) -> None:
        """End the attempt: release the lease (once) with `outcome`, then close the upstream response."""
        if not self.released:
            self.released = True
            self.record.duration_s = time.monotonic() - self.started_monotonic
            if outcome.failed:
                self.record.outcome = outcome.value
            self.lease.release(outcome, self.clock())
        await self.response.aclose()


@dataclass
class GateResult:
    attempts: list[AttemptRecord] = field(default_factory=list)
    winner: Candidate | None = None
    answer: CompleteAnswer | None = None
    stream: OpenStream | None = None

    @property
    def upstream_name(self) -> str:
        return self.winner.upstream.name if self.winner else "none"


class _AttemptFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


FailoverListener = Callable[[Candidate, Candidate, AttemptRecord], None]


class Gate:
    def __init__(self, leases: Leases, client: httpx.AsyncClient, clock: Callable[[], float] = time.time,
                 on_failover: FailoverListener | None = None, max_attempts: int | None = None) -> None:
        self.leases = leases
        self.client = client
        self.clock = clock
        self.on_failover = on_failover
        self.max_attempts = max_attempts  # None: as many as there are candidates

    async def run(self, request: LlmRequest, candidates: list[Candidate]) -> GateResult:
        result = GateResult()
        failed: tuple[Candidate, AttemptRecord] | None = None
        for over_limit in (False, True):
            for candidate in candidates:
                if self.max_attempts is not None and len(result.attempts) >= self.max_attempts:
                    break
                lease = await self.leases.acquire(candidate.node, self.clock(), streamed=request.stream,
                                                  over_limit=over_limit)
                if lease is None:
                    continue
                if failed and self.on_failover:
                    self.on_failover(failed[0], candidate, failed[1])
                record, outcome = await self._attempt(request, candidate, lease, result)
                result.attempts.append(record)
                if not outcome.failed:
                    result.winner = candidate
                    return result
                failed = (candidate, record)
            if result.attempts:
                break  # someone had room: the past-the-limit pass is only for when nobody had
        result.answer = failure_answer(result.attempts)
        return result

    async def _attempt(self, request: LlmRequest, candidate: Candidate, lease: Lease,
                       result: GateResult) -> tuple[AttemptRecord, Outcome]:
        upstream, node = candidate.upstream, candidate.node
        limit = upstream.first_byte_timeout if request.stream else upstream.request_timeout
        record = AttemptRecord(upstream=upstream.name, node=node.url, start=self.clock(), timeout_s=limit)
        started = time.monotonic()
        http_request = self.client.build_request(
            request.method, node.url + request.path,
            headers=upstream_headers(request.headers, candidate),
            content=request.body_for(upstream.model),
            timeout=httpx.Timeout(upstream.request_timeout),
        )
        response: httpx.Response | None = None
        outcome = Outcome.CANCELLED  # until known: an exception or cancellation is not the node's fault
        try:
            async with asyncio.timeout(limit):
                response = await self.client.send(http_request, stream=True)
                record.status = response.status_code
                if not request.stream:
                    record.ttfb_s = time.monotonic() - started
                outcome = status_outcome(response.status_code)
                if outcome.failed:
                    raise _AttemptFailed(outcome)
                if request.stream and response.status_code < 300:
                    opened = await self._open_stream(response, candidate, lease, record, started)
                else:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
                    opened = CompleteAnswer(response.status_code, response_headers(response), body)
                if isinstance(opened, OpenStream):
                    result.stream = opened
                else:
                    result.answer = opened
        except _AttemptFailed as failure:
            outcome = failure.outcome
        except TimeoutError:
            outcome = Outcome.TIMEOUT
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            outcome = Outcome.CONNECT_ERROR
        except (httpx.HTTPError, OSError):
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

    async def _open_stream(self, response: httpx.Response, candidate: Candidate, lease: Lease,
                           record: AttemptRecord, started: float) -> OpenStream | CompleteAnswer:
        """Read up to the first SSE data event: the stream that passed, or a whole answer without events."""
        rest = response.aiter_raw()
        head: list[bytes] = []
        buffer = b""
        async for chunk in rest:
            if record.ttfb_s is None:
                record.ttfb_s = time.monotonic() - started
            head.append(chunk)
            events, buffer = split_events(buffer + chunk)
            first = next((d for d in map(event_data, events) if d is not None), None)
            if first is not None and error_in(first):
                raise _AttemptFailed(Outcome.IN_BAND_ERROR)
            if first is not None or len(buffer) > MAX_FIRST_EVENT_BYTES:
                return OpenStream(response.status_code, response_headers(response), candidate, record, lease,
                                  response, head, rest, started, self.clock)
        if not head:
            raise _AttemptFailed(Outcome.RESET)
        # The server ended without an SSE event (it answered a stream request with plain JSON): pass it on.
        return CompleteAnswer(response.status_code, response_headers(response), b"".join(head))


def upstream_headers(client_headers: list[tuple[str, str]], candidate: Candidate) -> list[tuple[str, str]]:
    """The client's headers, fit for this upstream.

    The client's own credentials go only to the first upstream, and only when the profile gives it
    no key of its own: a fallback provider never sees them.
    """
    api_key = candidate.upstream.api_key
    keep_credentials = api_key is None and candidate.is_primary
    headers = [
        (k, v) for k, v in client_headers
        if k.lower() not in HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
        and (keep_credentials or k.lower() not in CLIENT_CREDENTIALS)
    ]
    headers.append(("accept-encoding", "identity"))  # the gate reads the first SSE event
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def response_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items()
            if k.lower() not in HOP_BY_HOP | {"content-length"}]


def _json_body(body: bytes) -> dict:
    if not body or body.lstrip()[:1] != b"{":
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


_UPSTREAM_ANSWERED = {Outcome.HTTP_ERROR, Outcome.RATE_LIMITED, Outcome.IN_BAND_ERROR, Outcome.RESET}


def failure_answer(attempts: list[AttemptRecord]) -> CompleteAnswer:
    """The OpenAI-style error for a request that no candidate could serve."""
    outcomes = {Outcome(a.outcome) for a in attempts}
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


def internal_error_answer() -> CompleteAnswer:
    body = {"error": {"message": "llm-ha: internal error, see the proxy's log", "type": "internal_error",
                      "code": "llm_ha_internal_error"}}
    return CompleteAnswer(502, [("content-type", "application/json")], json.dumps(body).encode())
