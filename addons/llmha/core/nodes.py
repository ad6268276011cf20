"""One object per node, one lease per attempt.

A `Node` owns what llm-ha knows about one upstream node: its health monitor (judged by the outlier
detector), its concurrency limiter, its latency statistics and its in-flight count. A `NodePool`
holds the nodes of one profile and the detector.

Every attempt on a node holds a `Lease`, as in Netflix's concurrency-limits (`Limiter.acquire()`
returns a listener): `acquire` hands one out at the moment the gate tries the node, or refuses when
the node is at its limit (that refusal, and only that, is a "shed"). The holder releases it exactly
once with the attempt's outcome, in a `finally`: an OK outcome is concurrency-limits' `onSuccess`,
a failure its `onDropped`, and `CANCELLED` (the client left, an error of ours) its `onIgnore`. A
streamed answer passes the gate at its first token: `first_byte` counts that success and the lease
stays held until the stream ends; a break after it (`release(STREAM_CUT)`) counts as a failure too.

The gate depends only on the `Leases` and `Lease` protocols, so a store shared between instances
can stand in for this in-process pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from .health import HealthEvent, NodeMonitor, OutlierDetector
from .latency import LatencyStats
from .limits import LimitSettings, NodeLimiter
from .profile import Profile, Upstream
from .types import NodeId, Outcome


class Lease(Protocol):
    node: NodeId

    def first_byte(self, ttfb_s: float | None, now: float) -> None:
        """The attempt passed the gate (a stream's first token): a success now; the lease stays held."""

    def release(self, outcome: Outcome, now: float, ttfb_s: float | None = None) -> None:
        """The attempt is over: frees the node's slot. Only the first call counts."""


class Leases(Protocol):
    async def acquire(self, node: NodeId, now: float, *, streamed: bool,
                      over_limit: bool = False) -> Lease | None:
        """A lease on `node`, or None when it is at its limit (unless `over_limit`)."""


class Node:
    def __init__(self, node_id: NodeId, upstream: Upstream, monitor: NodeMonitor) -> None:
        self.id = node_id
        self.upstream = upstream
        self.monitor = monitor
        self.limiter = NodeLimiter(LimitSettings.of(upstream))
        self.latency = LatencyStats()
        self.inflight = 0
        self.shed = 0

    def has_room(self, now: float) -> bool:
        limit = self.limiter.limit(now)
        return limit is None or self.inflight < limit

    def observe(self, outcome: Outcome, ttfb_s: float | None, now: float, streamed: bool) -> None:
        """What the limiter and the latency statistics learn from one outcome (the detector is told apart)."""
        if ttfb_s is not None:
            self.latency.add(now, ttfb_s)
        self.limiter.observe(outcome, ttfb_s, self.upstream.first_byte_timeout, self.inflight, streamed)

    def snapshot(self, now: float, interval: float) -> dict:
        m = self.monitor
        p50, p95 = self.latency.percentiles(now)
        ejected = m.is_ejected(now)
        return {
            "url": self.id.url,
            "state": "ejected" if ejected else "healthy",
            "k": m.k,
            "ejections": m.ejections,
            "ejected_remaining_s": round(m.ejected_until - now, 3) if ejected and m.ejected_until else 0.0,
            "failure_rate": round(m.last_failure_rate, 2),
            "requests": m.requests,
            "inflight": self.inflight,
            "ttfb_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttfb_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "failures": m.failures,
            "requests_per_s": round(m.last_interval_requests / interval, 2),
            "ttfb_history_ms": self.latency.history(now),
            "limit": self.limiter.limit(now),
            "shed": self.shed,
        }


class NodePool:
    """The nodes of one profile, their detector, and the in-process leases."""

    def __init__(self, profile: Profile, now: float, listener: Callable[[HealthEvent], None] | None = None) -> None:
        self.profile = profile
        self.listener = listener
        upstreams = {u.name: u for u in profile.upstreams}
        ids = [NodeId(u.name, url) for u in profile.upstreams for url in u.nodes]
        self.detector = OutlierDetector(profile.health_check, ids, now, self._on_health_event)
        self.nodes: dict[NodeId, Node] = {
            i: Node(i, upstreams[i.upstream], self.detector.monitors[i]) for i in ids}

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, node: NodeId) -> Node:
        return self.nodes[node]

    def try_acquire(self, node: NodeId, now: float, *, streamed: bool, over_limit: bool = False) -> LocalLease | None:
        target = self.nodes[node]
        if not over_limit and not target.has_room(now):
            target.shed += 1
            return None
        target.inflight += 1
        return LocalLease(self, target, streamed)

    async def acquire(self, node: NodeId, now: float, *, streamed: bool, over_limit: bool = False) -> LocalLease | None:
        return self.try_acquire(node, now, streamed=streamed, over_limit=over_limit)

    def is_available(self, node: NodeId, now: float) -> bool:
        return self.detector.is_available(node, now)

    def advance(self, now: float) -> None:
        self.detector.advance(now)

    def eject(self, node: NodeId, now: float) -> None:
        self.detector.eject(node, now)

    def restore(self, node: NodeId, now: float) -> None:
        self.detector.restore(node, now)

    def reset(self, now: float) -> None:
        """Every node back in rotation with k = 1 and fresh counters; leases in flight stay held."""
        self.detector.reset(now)
        for node in self:
            node.monitor = self.detector.monitors[node.id]

    def snapshot(self, node: NodeId, now: float) -> dict:
        self.advance(now)
        return self.nodes[node].snapshot(now, self.profile.health_check.interval)

    def _on_health_event(self, event: HealthEvent) -> None:
        if event.action == "uneject":
            self.nodes[NodeId(event.upstream, event.node)].limiter.returned(event.ts)
        if self.listener:
            self.listener(event)


class LocalLease:
    """A lease in one process's pool; see the module's docstring for what each call counts."""

    def __init__(self, pool: NodePool, node: Node, streamed: bool) -> None:
        self._pool = pool
        self._node = node
        self.node = node.id
        self.streamed = streamed
        self._judged = False
        self.released = False

    def first_byte(self, ttfb_s: float | None, now: float) -> None:
        if not self._judged and not self.released:
            self._judge(Outcome.OK, ttfb_s, now)

    def release(self, outcome: Outcome, now: float, ttfb_s: float | None = None) -> None:
        if self.released:
            return
        self.released = True
        if not self._judged:
            self._judge(outcome, ttfb_s, now)
        elif outcome.failed:  # broke after its first byte
            self._count(outcome, None, now)
        self._node.inflight -= 1

    def _judge(self, outcome: Outcome, ttfb_s: float | None, now: float) -> None:
        self._judged = True
        self._count(outcome, ttfb_s, now)

    def _count(self, outcome: Outcome, ttfb_s: float | None, now: float) -> None:
        if outcome.ignored:
            return
        self._pool.detector.record(self.node, outcome, now)
        self._node.observe(outcome, ttfb_s, now, self.streamed)
