"""The names every part of llm-ha shares: outcomes, node identities, attempt records, the flow metadata key.

Pure: no I/O, nothing from mitmproxy or httpx, so the replay tools and the core import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    IN_BAND_ERROR = "in_band_error"  # the first SSE event is an error object
    STREAM_CUT = "stream_cut"  # the stream broke after the client got bytes
    CANCELLED = "cancelled"  # the attempt was abandoned for a reason that is not the node's (the client left)

    @property
    def failed(self) -> bool:
        """Counts against the node's health."""
        return self not in _NOT_FAILURES

    @property
    def ignored(self) -> bool:
        """Says nothing about the node: not counted at all (concurrency-limits' `onIgnore`)."""
        return self is Outcome.CANCELLED


_NOT_FAILURES = frozenset({Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CANCELLED})


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
    """A node as the profile names it: its upstream and base URL."""

    upstream: str
    url: str

    def __str__(self) -> str:
        return f"{self.upstream} {self.url}"


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

    def to_dict(self) -> dict:
        return asdict(self)


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
