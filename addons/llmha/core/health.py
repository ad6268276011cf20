"""Passive health checking: failure-rate ejection with the k multiplier.

Modelled on Envoy's outlier detection: the `OutlierDetector` owns one `NodeMonitor` per node and the
interval clock, and reports every state change through a callback. Nothing here reads a clock or
does I/O: every call takes `now` (unix seconds), so tests drive time exactly and a recording can be
replayed on its own timestamps. Latency statistics live beside it (`latency.py`), not in it.

A monitored "node" is a `NodeId`: a node, or one model's entry on a node (`health_scope: model`,
`nodes.py`), made with `add` and dropped with `remove`; the rules are the same for both.

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
  below the threshold; its health clock restarts at each return and each decrease;
- with active probing on (`probing`, set by the pool from the profile's `probe`), an ejection that
  ends returns the node only if its last probe passed; otherwise the node is "held" out, k unchanged,
  until a probe passes (`probe_result`). With `early_return_after` N > 0, N passes in a row end an
  ejection before its time (a departure from the source document, off by default);
- by hand (operator commands, events marked `by: "hand"`): `eject` as if the node had failed (k grows),
  `drain` for a given time leaving k as it is, `restore` ends an ejection, `reset` forgets everything.
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
    action: str  # eject | uneject | hold | k_decrease | reset (failover and probe events come from elsewhere)
    upstream: str
    node: str
    k: int
    duration_s: float | None = None
    failure_rate: float | None = None
    by: str | None = None  # "hand": caused by an operator command
    model: str | None = None  # a model's entry on the node (`health_scope: model`), not the node's own

    def to_dict(self) -> dict:
        event = asdict(self)
        for optional in ("by", "model"):
            if event[optional] is None:
                del event[optional]
        return event


HealthListener = Callable[[HealthEvent], None]


@dataclass(frozen=True)
class EjectionState:
    """What instances sharing state agree on about one node (`shared/`): its ejection, k and k's decay."""

    next_k: int
    ejection_k: int
    ejected_until: float | None
    ejections: int
    healthy_since: float
    ejection_failure_rate: float | None = None


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
        self.ejection_failure_rate: float | None = None  # the rate that caused the current ejection
        self.last_interval_requests = 0
        self.requests = 0
        self.failures = 0
        self.probing = False  # an ejection's end waits for a passing probe
        self.early_return_after = 0  # > 0: this many probe passes in a row end an ejection early
        self.held = False  # the ejection's time is up, but no probe has passed since it began
        self.probe_passes = 0  # probes passed in a row during this ejection

    def is_ejected(self, now: float) -> bool:
        return self.held or (self.ejected_until is not None and now < self.ejected_until)

    def probe_result(self, passed: bool, now: float) -> HealthEvent | None:
        """A probe of this ejected node passed or failed: a held node, or (opted in) a passing one, returns."""
        if self.ejected_until is None:
            return None
        self.probe_passes = self.probe_passes + 1 if passed else 0
        early = 0 < self.early_return_after <= self.probe_passes
        if passed and (self.held or early):
            return self.uneject(now, by=None if self.held else "probe")
        return None

    @property
    def k(self) -> int:
        """The current ejection's multiplier while ejected, else the next ejection's."""
        return self.ejection_k if self.ejected_until is not None else self.next_k

    def record(self, outcome: Outcome) -> None:
        self.count(outcome.failed)

    def count(self, failed: bool) -> None:
        self.requests += 1
        self.bucket_total += 1
        if failed:
            self.failures += 1
            self.bucket_failed += 1

    def close_interval(self, boundary: float) -> HealthEvent | None:
        return self.judge(boundary, *self.end_interval())

    def end_interval(self) -> tuple[int, int]:
        """The closing interval's attempts and failures; the counts start again from zero."""
        total, failed = self.bucket_total, self.bucket_failed
        self.bucket_total = self.bucket_failed = 0
        self.last_interval_requests = total
        self.last_failure_rate = 100.0 * failed / total if total else 0.0
        return total, failed

    def judge(self, boundary: float, total: int, failed: int) -> HealthEvent | None:
        """Eject if one interval's counts (this process's, or a whole cluster's) pass the threshold."""
        if self.ejected_until is not None or total < self.config.min_requests:
            return None
        failure_rate = 100.0 * failed / total
        if failure_rate >= self.config.failure_rate_threshold:
            return self.eject(boundary, failure_rate)
        return None

    def ejection_state(self) -> EjectionState:
        return EjectionState(self.next_k, self.ejection_k, self.ejected_until, self.ejections, self.healthy_since,
                             self.ejection_failure_rate)

    def apply(self, state: EjectionState) -> None:
        """Take on an ejection state decided elsewhere; no event (the instance that decided reported it)."""
        self.next_k, self.ejection_k = state.next_k, state.ejection_k
        self.ejected_until, self.ejections, self.healthy_since = state.ejected_until, state.ejections, state.healthy_since
        self.ejection_failure_rate = state.ejection_failure_rate
        self.held = False  # an ejection whose time is already up is held again by its timer, if probing

    def eject(self, now: float, failure_rate: float | None, by: str | None = None) -> HealthEvent:
        k = self.next_k
        duration = min(k * self.config.base_ejection_time, self.config.max_ejection_time)
        self.ejection_k = k
        self.ejected_until = now + duration
        self.ejection_failure_rate = failure_rate
        self.ejections += 1
        self.probe_passes = 0
        if k * self.config.base_ejection_time < self.config.max_ejection_time:
            self.next_k = k + 1
        return self._event(now, "eject", k, duration, failure_rate, by)

    def drain(self, now: float, duration: float) -> HealthEvent:
        """Out of rotation for `duration` by hand (maintenance): k is left as it is, the node did not fail."""
        if self.ejected_until is None:
            self.ejection_k = self.next_k
            self.ejection_failure_rate = None
            self.ejections += 1
        self.ejected_until = now + duration
        self.held = False
        return self._event(now, "eject", self.ejection_k, duration, None, "hand")

    def next_timer(self) -> float:
        """When this node next changes state by itself (return, or a k decrease); inf if never."""
        if self.held:
            return math.inf
        if self.ejected_until is not None:
            return self.ejected_until
        if self.next_k > 1:
            return self.healthy_since + self.config.k_decay_period
        return math.inf

    def fire_timer(self, at: float) -> HealthEvent:
        if self.ejected_until is not None and self.probing and self.probe_passes == 0:
            self.held = True  # no probe has passed: out until one does, k as it is
            return self._event(at, "hold", self.ejection_k)
        if self.ejected_until is not None:
            return self.uneject(at)
        self.next_k -= 1
        self.healthy_since = at
        return self._event(at, "k_decrease", self.next_k)

    def uneject(self, at: float, by: str | None = None) -> HealthEvent:
        k = self.ejection_k
        self.ejected_until = None
        self.ejection_k = 0
        self.ejection_failure_rate = None
        self.held = False
        self.probe_passes = 0
        self.healthy_since = at
        return self._event(at, "uneject", k, by=by)

    def _event(self, ts: float, action: str, k: int, duration: float | None = None,
               failure_rate: float | None = None, by: str | None = None) -> HealthEvent:
        return HealthEvent(ts=ts, action=action, upstream=self.node.upstream, node=self.node.url, k=k,
                           duration_s=duration, failure_rate=failure_rate, by=by, model=self.node.model or None)

    @property
    def blank(self) -> bool:
        """Holds nothing worth keeping: in rotation, k = 1, no attempts in the open interval."""
        return self.ejected_until is None and self.next_k == 1 and self.bucket_total == 0


class OutlierDetector:
    """Every node's monitor, the interval clock, and the state changes, reported to `listener`."""

    def __init__(self, config: HealthCheck, nodes: Iterable[NodeId], now: float,
                 listener: HealthListener | None = None) -> None:
        self.config = config
        self.started = now
        self.monitors: dict[NodeId, NodeMonitor] = {n: self.new_monitor(n, now) for n in nodes}
        self.listener = listener
        self.judging = True  # False: intervals are counted but judged elsewhere (a cluster's shared state)
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
        self.count(node, outcome.failed, now)

    def count(self, node: NodeId, failed: bool, now: float) -> None:
        """One finished attempt on `node` (a node, or a model's entry on one), failed or not."""
        self.advance(now)
        self.monitors[node].count(failed)
        self._recorded_since_close = True

    def add(self, node: NodeId, now: float) -> NodeMonitor:
        """A new entry (a model's on a node), in rotation with k = 1; counted from now, judged with the rest."""
        monitor = self.monitors[node] = self.new_monitor(node, now)
        return monitor

    def remove(self, node: NodeId) -> None:
        del self.monitors[node]

    def is_available(self, node: NodeId, now: float) -> bool:
        self.advance(now)
        return not self.monitors[node].is_ejected(now)

    def eject(self, node: NodeId, now: float) -> None:
        """Eject by hand (as if it had failed), unless already ejected."""
        self.advance(now)
        monitor = self.monitors[node]
        if not monitor.is_ejected(now):
            self._report(monitor.eject(now, None, by="hand"))

    def drain(self, node: NodeId, now: float, duration: float) -> None:
        """Take a node out of rotation by hand for `duration` seconds from now, k unchanged."""
        self.advance(now)
        self._report(self.monitors[node].drain(now, duration))

    def judge(self, node: NodeId, boundary: float, total: int, failed: int, now: float) -> HealthEvent | None:
        """Judge `node` on counts gathered elsewhere for the interval ending at `boundary`; reports an ejection."""
        self.advance(now)
        event = self.monitors[node].judge(boundary, total, failed)
        if event:
            self._report(event)
        return event

    def probe_result(self, node: NodeId, passed: bool, now: float) -> None:
        """An active probe of `node` passed or failed; may return it (see NodeMonitor.probe_result)."""
        self.advance(now)
        if event := self.monitors[node].probe_result(passed, now):
            self._report(event)

    def apply(self, node: NodeId, state: EjectionState) -> None:
        """Take on `node`'s ejection state decided elsewhere, silently; its timers fire from here on."""
        self.monitors[node].apply(state)

    def restore(self, node: NodeId, now: float) -> None:
        """End a node's ejection now; k stays as it is."""
        self.advance(now)
        monitor = self.monitors[node]
        if monitor.is_ejected(now):
            self._report(monitor.uneject(now, by="hand"))

    def reset(self, now: float) -> None:
        """Forget every node's history: all in rotation, k = 1."""
        self.advance(now)
        self.monitors = {node: self.new_monitor(node, now) for node in self.monitors}
        for node in self.monitors:
            self._report(HealthEvent(now, "reset", node.upstream, node.url, k=1, by="hand", model=node.model or None))

    def _report(self, event: HealthEvent) -> None:
        if self.listener:
            self.listener(event)

    def _next_boundary(self) -> float:
        return self.started + (self._intervals_closed + 1) * self.config.interval

    def _close_interval(self, boundary: float) -> None:
        self._intervals_closed += 1
        self._recorded_since_close = False
        for monitor in self.monitors.values():
            if not self.judging:
                monitor.end_interval()
            elif event := monitor.close_interval(boundary):
                self._report(event)

    def _skip_empty_intervals(self, until: float) -> None:
        """Intervals with no attempts eject nobody: close them all at once (replays can have long gaps)."""
        for monitor in self.monitors.values():
            monitor.last_interval_requests = 0
            monitor.last_failure_rate = 0.0
        elapsed = math.floor((until - self.started) / self.config.interval + 1e-9)
        self._intervals_closed = max(self._intervals_closed + 1, elapsed)
