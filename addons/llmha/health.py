"""Passive health checking: failure-rate ejection with the k multiplier.

Modelled on Envoy's outlier detector: a `HealthTracker` (the detector) owns one `NodeMonitor` per
upstream node. Nothing here reads a clock or does I/O: every call takes `now` (unix seconds), so
tests drive time exactly and a recording can be replayed on its own timestamps.

The rules, per node:
- attempt outcomes are counted per interval; intervals are aligned to the tracker's start;
- at each interval boundary a node that is in rotation, with at least `min_requests` finished
  attempts and a failure rate >= `failure_rate_threshold` percent, is ejected for
  `min(k * base_ejection_time, max_ejection_time)`;
- k starts at 1 and grows by one per ejection, except that (as in Envoy) it stops growing once
  `k * base_ejection_time` reaches `max_ejection_time`;
- an ejected node returns by itself when its time is up;
- while in rotation, k shrinks by one for every `k_decay_after` (default: `base_ejection_time`) of
  continuous health, never below 1. A node stays "healthy" through intervals whose failure rate is
  below the threshold; its health clock restarts at each return and each decrease.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum

from .profile import HealthCheck

TTFB_WINDOW_S = 60.0
TTFB_SAMPLES_KEPT = 4096


class Outcome(StrEnum):
    OK = "ok"
    CLIENT_ERROR = "client_error"  # a 4xx other than 429: the client's problem, returned as is
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    RESET = "reset"  # the connection broke before the first byte
    HTTP_ERROR = "http_error"  # 5xx
    RATE_LIMITED = "rate_limited"  # 429
    IN_BAND_ERROR = "in_band_error"  # the first SSE event is an error object
    STREAM_CUT = "stream_cut"  # the stream broke after the client got bytes: not retried

    @property
    def failed(self) -> bool:
        return self not in (Outcome.OK, Outcome.CLIENT_ERROR)


@dataclass(frozen=True, order=True)
class Node:
    upstream: str
    url: str

    def __str__(self) -> str:
        return f"{self.upstream} {self.url}"


@dataclass(frozen=True)
class HealthEvent:
    ts: float
    action: str  # eject | uneject | k_decrease (failover events come from the gate)
    upstream: str
    node: str
    k: int
    duration_s: float | None = None
    failure_rate: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class NodeMonitor:
    """One node's counters and ejection state."""

    def __init__(self, node: Node, config: HealthCheck, now: float) -> None:
        self.node = node
        self.config = config
        self.next_k = 1
        self.ejection_k = 0
        self.ejected_until: float | None = None
        self.ejections = 0
        self.healthy_since = now
        self.bucket_total = 0
        self.bucket_failed = 0
        self.last_failure_rate = 0.0
        self.last_interval_requests = 0
        self.requests = 0
        self.failures = 0
        self.inflight = 0
        self.ttfb_samples: deque[tuple[float, float]] = deque(maxlen=TTFB_SAMPLES_KEPT)

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    @property
    def k(self) -> int:
        """The current ejection's multiplier while ejected, else the next ejection's."""
        return self.ejection_k if self.ejected_until is not None else self.next_k

    def record(self, outcome: Outcome, now: float, ttfb: float | None) -> None:
        self.requests += 1
        self.bucket_total += 1
        if outcome.failed:
            self.failures += 1
            self.bucket_failed += 1
        if ttfb is not None:
            self.ttfb_samples.append((now, ttfb))

    def close_interval(self, boundary: float) -> HealthEvent | None:
        total, failed = self.bucket_total, self.bucket_failed
        self.bucket_total = self.bucket_failed = 0
        self.last_interval_requests = total
        self.last_failure_rate = 100.0 * failed / total if total else 0.0
        if self.ejected_until is not None or total < self.config.min_requests:
            return None
        if self.last_failure_rate >= self.config.failure_rate_threshold:
            return self.eject(boundary, self.last_failure_rate)
        return None

    def eject(self, now: float, failure_rate: float | None) -> HealthEvent:
        k = self.next_k
        duration = min(k * self.config.base_ejection_time, self.config.max_ejection_time)
        self.ejection_k = k
        self.ejected_until = now + duration
        self.ejections += 1
        if k * self.config.base_ejection_time < self.config.max_ejection_time:
            self.next_k = k + 1
        return self._event(now, "eject", k, duration, failure_rate)

    def next_timer(self) -> float:
        """When this node next changes state by itself (return, or a k decrease); inf if never."""
        if self.ejected_until is not None:
            return self.ejected_until
        if self.next_k > 1:
            return self.healthy_since + self.config.k_decay_period
        return math.inf

    def fire_timer(self, at: float) -> HealthEvent:
        if self.ejected_until is not None:
            return self.uneject(at)
        self.next_k -= 1
        self.healthy_since = at
        return self._event(at, "k_decrease", self.next_k)

    def uneject(self, at: float) -> HealthEvent:
        k = self.ejection_k
        self.ejected_until = None
        self.ejection_k = 0
        self.healthy_since = at
        return self._event(at, "uneject", k)

    def ttfb_percentiles(self, now: float) -> tuple[float | None, float | None]:
        recent = sorted(t for ts, t in self.ttfb_samples if now - ts <= TTFB_WINDOW_S)
        if not recent:
            return None, None
        return _percentile(recent, 50), _percentile(recent, 95)

    def ttfb_history(self, now: float, seconds: int = 60) -> list[float | None]:
        """Median TTFB (ms) per second over the last `seconds`, oldest first."""
        per_second: list[list[float]] = [[] for _ in range(seconds)]
        for ts, ttfb in self.ttfb_samples:
            age = int(now - ts)
            if 0 <= age < seconds:
                per_second[seconds - 1 - age].append(ttfb)
        return [round(_percentile(sorted(s), 50) * 1000, 1) if s else None for s in per_second]

    def _event(self, ts: float, action: str, k: int, duration: float | None = None,
               failure_rate: float | None = None) -> HealthEvent:
        return HealthEvent(ts=ts, action=action, upstream=self.node.upstream, node=self.node.url, k=k,
                           duration_s=duration, failure_rate=failure_rate)


class HealthTracker:
    """The detector: every node's monitor, the interval clock, and the events they produce."""

    def __init__(self, config: HealthCheck, nodes: Iterable[Node], now: float) -> None:
        self.config = config
        self.started = now
        self.monitors: dict[Node, NodeMonitor] = {n: NodeMonitor(n, config, now) for n in nodes}
        self._intervals_closed = 0
        self._recorded_since_close = False
        self._events: list[HealthEvent] = []

    @property
    def nodes(self) -> list[Node]:
        return list(self.monitors)

    def advance(self, now: float) -> None:
        """Close every interval and fire every timer due by `now`, in time order."""
        while True:
            boundary = self._next_boundary()
            monitor = min(self.monitors.values(), key=NodeMonitor.next_timer, default=None)
            timer = monitor.next_timer() if monitor else math.inf
            if min(boundary, timer) > now:
                return
            if timer <= boundary:
                self._events.append(monitor.fire_timer(timer))
            elif self._recorded_since_close:
                self._close_interval(boundary)
            else:
                self._skip_empty_intervals(min(now, timer))

    def record(self, node: Node, outcome: Outcome, now: float, ttfb: float | None = None) -> None:
        self.advance(now)
        self.monitors[node].record(outcome, now, ttfb)
        self._recorded_since_close = True

    def attempt_started(self, node: Node) -> None:
        self.monitors[node].inflight += 1

    def attempt_ended(self, node: Node) -> None:
        monitor = self.monitors[node]
        monitor.inflight = max(0, monitor.inflight - 1)

    def is_available(self, node: Node, now: float) -> bool:
        self.advance(now)
        return not self.monitors[node].is_ejected(now)

    def eject(self, node: Node, now: float) -> None:
        """Eject by hand (as if it had failed), unless already ejected."""
        self.advance(now)
        monitor = self.monitors[node]
        if not monitor.is_ejected(now):
            self._events.append(monitor.eject(now, None))

    def restore(self, node: Node, now: float) -> None:
        """End a node's ejection now; k stays as it is."""
        self.advance(now)
        monitor = self.monitors[node]
        if monitor.is_ejected(now):
            self._events.append(monitor.uneject(now))

    def reset(self, now: float) -> None:
        """Forget every node's history: all in rotation, k = 1."""
        self.advance(now)
        for node, old in self.monitors.items():
            fresh = NodeMonitor(node, self.config, now)
            fresh.inflight = old.inflight
            self.monitors[node] = fresh

    def take_events(self) -> list[HealthEvent]:
        events, self._events = self._events, []
        return events

    def snapshot(self, node: Node, now: float) -> dict:
        self.advance(now)
        m = self.monitors[node]
        p50, p95 = m.ttfb_percentiles(now)
        ejected = m.is_ejected(now)
        return {
            "url": node.url,
            "state": "ejected" if ejected else "healthy",
            "k": m.k,
            "ejections": m.ejections,
            "ejected_remaining_s": round(m.ejected_until - now, 3) if ejected else 0.0,
            "failure_rate": round(m.last_failure_rate, 2),
            "requests": m.requests,
            "inflight": m.inflight,
            "ttfb_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttfb_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "failures": m.failures,
            "requests_per_s": round(m.last_interval_requests / self.config.interval, 2),
            "ttfb_history_ms": m.ttfb_history(now),
        }

    def _next_boundary(self) -> float:
        return self.started + (self._intervals_closed + 1) * self.config.interval

    def _close_interval(self, boundary: float) -> None:
        self._intervals_closed += 1
        self._recorded_since_close = False
        for monitor in self.monitors.values():
            event = monitor.close_interval(boundary)
            if event:
                self._events.append(event)

    def _skip_empty_intervals(self, until: float) -> None:
        """Intervals with no attempts eject nobody: close them all at once (replays can have long gaps)."""
        for monitor in self.monitors.values():
            monitor.last_interval_requests = 0
            monitor.last_failure_rate = 0.0
        elapsed = math.floor((until - self.started) / self.config.interval + 1e-9)
        self._intervals_closed = max(self._intervals_closed + 1, elapsed)


def _percentile(sorted_values: list[float], pct: float) -> float:
    rank = (len(sorted_values) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)
