"""Passive health checking: failure-rate ejection with the k multiplier.

Modelled on Envoy's outlier detection: the `OutlierDetector` owns one `NodeMonitor` per node and the
interval clock, and reports every state change through a callback. Nothing here reads a clock or
does I/O: every call takes `now` (unix seconds), so tests drive time exactly and a recording can be
replayed on its own timestamps. Latency statistics live beside it (`latency.py`), not in it.

The rules, per node:
- attempt outcomes are counted per interval; intervals are aligned to the detector's start;
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from .profile import HealthCheck
from .types import NodeId, Outcome


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


HealthListener = Callable[[HealthEvent], None]


class NodeMonitor:
    """One node's outcome counts for the current interval and its ejection state."""

    def __init__(self, node: NodeId, config: HealthCheck, now: float) -> None:
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

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    @property
    def k(self) -> int:
        """The current ejection's multiplier while ejected, else the next ejection's."""
        return self.ejection_k if self.ejected_until is not None else self.next_k

    def record(self, outcome: Outcome) -> None:
        self.requests += 1
        self.bucket_total += 1
        if outcome.failed:
            self.failures += 1
            self.bucket_failed += 1

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

    def _event(self, ts: float, action: str, k: int, duration: float | None = None,
               failure_rate: float | None = None) -> HealthEvent:
        return HealthEvent(ts=ts, action=action, upstream=self.node.upstream, node=self.node.url, k=k,
                           duration_s=duration, failure_rate=failure_rate)


class OutlierDetector:
    """Every node's monitor, the interval clock, and the state changes, reported to `listener`."""

    def __init__(self, config: HealthCheck, nodes: Iterable[NodeId], now: float,
                 listener: HealthListener | None = None) -> None:
        self.config = config
        self.started = now
        self.monitors: dict[NodeId, NodeMonitor] = {n: self.new_monitor(n, now) for n in nodes}
        self.listener = listener
        self._intervals_closed = 0
        self._recorded_since_close = False

    def new_monitor(self, node: NodeId, now: float) -> NodeMonitor:
        return NodeMonitor(node, self.config, now)

    @property
    def nodes(self) -> list[NodeId]:
        return list(self.monitors)

    def advance(self, now: float) -> None:
        """Close every interval and fire every timer due by `now`, in time order."""
        while True:
            boundary = self._next_boundary()
            monitor = min(self.monitors.values(), key=NodeMonitor.next_timer, default=None)
            timer = monitor.next_timer() if monitor else math.inf
            if min(boundary, timer) > now:
                return
            if monitor is not None and timer <= boundary:
                self._report(monitor.fire_timer(timer))
            elif self._recorded_since_close:
                self._close_interval(boundary)
            else:
                self._skip_empty_intervals(min(now, timer))

    def record(self, node: NodeId, outcome: Outcome, now: float) -> None:
        self.advance(now)
        self.monitors[node].record(outcome)
        self._recorded_since_close = True

    def is_available(self, node: NodeId, now: float) -> bool:
        self.advance(now)
        return not self.monitors[node].is_ejected(now)

    def eject(self, node: NodeId, now: float) -> None:
        """Eject by hand (as if it had failed), unless already ejected."""
        self.advance(now)
        monitor = self.monitors[node]
        if not monitor.is_ejected(now):
            self._report(monitor.eject(now, None))

    def restore(self, node: NodeId, now: float) -> None:
        """End a node's ejection now; k stays as it is."""
        self.advance(now)
        monitor = self.monitors[node]
        if monitor.is_ejected(now):
            self._report(monitor.uneject(now))

    def reset(self, now: float) -> None:
        """Forget every node's history: all in rotation, k = 1."""
        self.advance(now)
        self.monitors = {node: self.new_monitor(node, now) for node in self.monitors}

    def _report(self, event: HealthEvent) -> None:
        if self.listener:
            self.listener(event)

    def _next_boundary(self) -> float:
        return self.started + (self._intervals_closed + 1) * self.config.interval

    def _close_interval(self, boundary: float) -> None:
        self._intervals_closed += 1
        self._recorded_since_close = False
        for monitor in self.monitors.values():
            event = monitor.close_interval(boundary)
            if event:
                self._report(event)

    def _skip_empty_intervals(self, until: float) -> None:
        """Intervals with no attempts eject nobody: close them all at once (replays can have long gaps)."""
        for monitor in self.monitors.values():
            monitor.last_interval_requests = 0
            monitor.last_failure_rate = 0.0
        elapsed = math.floor((until - self.started) / self.config.interval + 1e-9)
        self._intervals_closed = max(self._intervals_closed + 1, elapsed)
