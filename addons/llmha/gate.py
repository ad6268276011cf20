"""The failover gate: try candidates in order until one answers in time, before the client sees a byte.

An attempt fails on a connection error, a reset before the first byte, a late first token (streaming:
no SSE data event within `first_byte_timeout`; otherwise: no complete answer within
`request_timeout`), HTTP 5xx or 429, or a first SSE event that is an error object. A failed attempt
is closed at once, so an overloaded server can drop the work, and the next candidate is tried. A
streaming attempt that passes leaves the gate as an `OpenStream`, its first event already read;
anything else leaves as a `CompleteAnswer`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import httpx

from .candidates import Candidate
from .health import HealthTracker, Outcome
from .limits import LimitTracker
from .sse import error_in, event_data, split_events

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
class AttemptRecord:
    upstream: str
    node: str
    start: float
    outcome: str = ""
    status: int | None = None
    ttfb_s: float | None = None
    duration_s: float | None = None
    timeout_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompleteAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class OpenStream:
    """A streaming answer that passed the gate; `chunks()` yields it from its first byte on."""

    status: int
    headers: list[tuple[str, str]]
    candidate: Candidate
    record: AttemptRecord
    response: httpx.Response
    head: list[bytes]
    rest: AsyncIterator[bytes]
    started_monotonic: float

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.head:
            yield chunk
        async for chunk in self.rest:
            yield chunk

    async def aclose(self) -> None:
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
    def __init__(self, tracker: HealthTracker, limits: LimitTracker, client: httpx.AsyncClient,
                 clock: Callable[[], float] = time.time, on_failover: FailoverListener | None = None) -> None:
        self.tracker = tracker
        self.limits = limits
        self.client = client
        self.clock = clock
        self.on_failover = on_failover

    async def run(self, request: LlmRequest, candidates: list[Candidate]) -> GateResult:
        result = GateResult()
        for i, candidate in enumerate(candidates):
            record, outcome = await self._attempt(request, candidate, result)
            result.attempts.append(record)
            if not outcome.failed:
                result.winner = candidate
                return result
            if i + 1 < len(candidates) and self.on_failover:
                self.on_failover(candidate, candidates[i + 1], record)
        result.answer = failure_answer(result.attempts)
        return result

    async def _attempt(self, request: LlmRequest, candidate: Candidate,
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
        self.tracker.attempt_started(node)
        response: httpx.Response | None = None
        keep_open = False
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
                    keep_open = await self._open_stream(response, candidate, record, started, result)
                else:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
                    result.answer = CompleteAnswer(response.status_code, response_headers(response), body)
        except _AttemptFailed as failed:
            outcome = failed.outcome
        except TimeoutError:
            outcome = Outcome.TIMEOUT
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            outcome = Outcome.CONNECT_ERROR
        except (httpx.HTTPError, OSError):
            outcome = Outcome.RESET
        finally:
            if response is not None and not keep_open:
                await response.aclose()
        record.outcome = outcome.value
        if not keep_open:
            record.duration_s = time.monotonic() - started
            self.tracker.attempt_ended(node)
        self.tracker.record(node, outcome, self.clock(), record.ttfb_s)
        self.limits.observe(node, outcome, record.ttfb_s, upstream.first_byte_timeout,
                            self.tracker.monitors[node].inflight, streamed=request.stream)
        return record, outcome

    async def _open_stream(self, response: httpx.Response, candidate: Candidate, record: AttemptRecord,
                           started: float, result: GateResult) -> bool:
        """Read up to the first SSE data event. True: the stream passed and stays open."""
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
                result.stream = OpenStream(response.status_code, response_headers(response), candidate, record,
                                           response, head, rest, started)
                return True
        if not head:
            raise _AttemptFailed(Outcome.RESET)
        # The server ended without an SSE event (it answered a stream request with plain JSON): pass it on.
        result.answer = CompleteAnswer(response.status_code, response_headers(response), b"".join(head))
        return False


def status_outcome(status: int) -> Outcome:
    """How llm-ha judges an HTTP status: 5xx and 429 fail the attempt; other 4xx are the client's."""
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500:
        return Outcome.HTTP_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.OK


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


def describe_attempt(a: AttemptRecord | dict) -> str:
    """`primary timeout 200ms`, `fallback ok 83ms`, `primary http_error 500`: for comments and errors."""
    a = a if isinstance(a, dict) else a.to_dict()
    if a["outcome"] == Outcome.TIMEOUT:
        detail = f"{a['timeout_s'] * 1000:.0f}ms" if a.get("timeout_s") else ""
    elif a["outcome"] in (Outcome.OK, Outcome.STREAM_CUT) and a.get("ttfb_s") is not None:
        detail = f"{a['ttfb_s'] * 1000:.0f}ms"
    else:
        detail = str(a["status"]) if a.get("status") else ""
    return " ".join(p for p in (a["upstream"], a["outcome"], detail) if p)
