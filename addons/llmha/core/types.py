"""The names every part of llm-ha shares: outcomes, node identities, attempt records, the flow metadata key.

Pure: no I/O, nothing from mitmproxy or httpx, so the replay tools and the core import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

META_KEY = "llm_ha"  # flow.metadata[META_KEY]: what llm-ha did with a flow


class Outcome(StrEnum):
    OK = "ok"
    CLIENT_ERROR = "client_error"  # a 4xx other than 429: the client's problem, returned as is
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    RESET = "reset"  # the connection broke before the first byte
    HTTP_ERROR = "http_error"  # 5xx
    RATE_LIMITED = "rate_limited"  # 429
    IN_BAND_ERROR = "in_band_error"  # an error object in a 200: the first SSE event, or the JSON body
    INVALID_ANSWER = "invalid_answer"  # a 2xx that is no API answer (an HTML page from something in between)
    STREAM_CUT = "stream_cut"  # the stream broke (reset, cut) after the client got bytes
    STALLED = "stalled"  # no progress for `stream_idle_timeout` after the first token
    TRUNCATED = "truncated"  # ended without its protocol's end (`[DONE]`, a finish reason)
    CANCELLED = "cancelled"  # the attempt was abandoned for a reason that is not the node's (the client left)
    DECLINED = "declined"  # a 4xx the upstream's `failover_on` lists: the request moves on; not the node's fault

    @property
    def failed(self) -> bool:
        """Counts against the node's health."""
        return self not in _NOT_FAILURES

    @property
    def broke_stream(self) -> bool:
        """A stream that had passed the gate ended this way: the answer is incomplete."""
        return self in _BREAKS

    @property
    def ignored(self) -> bool:
        """Says nothing about the node: not counted at all (concurrency-limits' `onIgnore`)."""
        return self is Outcome.CANCELLED


_NOT_FAILURES = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CANCELLED, Outcome.DECLINED})
_BREAKS = frozenset({Outcome.STREAM_CUT, Outcome.STALLED, Outcome.TRUNCATED, Outcome.IN_BAND_ERROR})


def status_outcome(status: int) -> Outcome:
    """How llm-ha judges an HTTP status: 5xx and 429 fail the attempt; other 4xx are the client's."""
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500:
        return Outcome.HTTP_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.OK


@dataclass(frozen=True, order=True)
class NodeId:
    """A node as the profile names it: its upstream and base URL.

    With a `model`, it names one model's health entry on that node (an upstream whose `health_scope`
    is `model`, see `core/nodes.py`); the node itself, its capacity and leases, has `model` "".
    """

    upstream: str
    url: str
    model: str = ""

    def __str__(self) -> str:
        return f"{self.upstream} {self.url}#{self.model}" if self.model else f"{self.upstream} {self.url}"

    @property
    def node(self) -> NodeId:
        """The node this names (itself, or the node a model's entry is on)."""
        return NodeId(self.upstream, self.url) if self.model else self

    def for_model(self, model: str) -> NodeId:
        return NodeId(self.upstream, self.url, model)


@dataclass
class AttemptRecord:
    """One upstream attempt as the flow records it (`flow.metadata["llm_ha"]["attempts"]`)."""

    upstream: str
    node: str
    start: float
    outcome: str = ""
    status: int | None = None
    ttfb_s: float | None = None
    duration_s: float | None = None
    timeout_s: float | None = None
    events: int | None = None  # a stream that broke after its first byte: data events the client had
    resumed: bool = False  # this attempt continued an answer broken on another node
    hedge: bool = False  # started while an earlier attempt still waited for its first token (`hedge_after`)

    def to_dict(self) -> dict:
        return dict(vars(self))  # its fields are all plain values: asdict's deep copy costs 10x


def describe_attempt(a: AttemptRecord | dict) -> str:
    """`primary timeout 200ms`, `fallback ok 83ms`, `primary http_error 500`,
    `primary ok 80ms, stream_cut after 41 events`, `fallback resumed 95ms`: for comments and errors."""
    a = a if isinstance(a, dict) else a.to_dict()
    outcome, ttfb = a["outcome"], a.get("ttfb_s")
    if a.get("events") is not None:  # broke after the client had bytes
        return f"{a['upstream']} ok {_ms(ttfb)}, {outcome} after {a['events']} events"
    if outcome == Outcome.TIMEOUT:
        detail = _ms(a.get("timeout_s"))
    elif outcome == Outcome.OK and ttfb is not None:
        detail = _ms(ttfb)
    else:
        detail = str(a["status"]) if a.get("status") else ""
    if outcome == Outcome.OK and a.get("resumed"):
        outcome = "resumed"
    return " ".join(p for p in (a["upstream"], outcome, detail) if p)


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds else ""
