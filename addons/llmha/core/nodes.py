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
An attempt still without a verdict long after its limit (`_overdue_after`) is counted as a timeout
when the pool next advances, so that a node it hangs on is judged in that interval, not when it ends.

The gate depends only on the `Leases` and `Lease` protocols, so a store shared between instances
can stand in for this in-process pool.

Health scope (an upstream's `health_scope`). `node` (the default; a self-hosted server): the node is
one unit, every outcome counts against it. `model` (a hosted API serving many models behind one URL,
each with its own rate limits): the model a request is sent (the upstream's `model`, else the
client's) has its own health entry on the node, a `NodeId` with that `model`, judged by the detector
like a node, so a model out on a node leaves that node in rotation for the others. The node's own
entry still takes every attempt, but counts as failures only the endpoint's (`ENDPOINT_FAILURES`: it
could not be reached); an answer that fails (5xx, 429, a timeout, a broken stream) is the model's.
Capacity (limits, leases, in-flight, latency) and active probing stay the node's: a model's entry
returns when its ejection ends. Client-chosen names must not grow the state without bound: a node has
at most `MAX_MODELS_PER_NODE` model entries; a new model then takes the place of a blank one (in
rotation, k = 1, nothing counted in the open interval), or, if there is none, is judged with the
node's own entry, as are names longer than `MAX_MODEL_NAME`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

from .health import HealthEvent, NodeMonitor, OutlierDetector
from .latency import LatencyStats
from .limits import LimitSettings, NodeLimiter
from .profile import Profile, Upstream
from .types import NodeId, Outcome

OVERDUE_CHECK_S = 0.1  # how often `advance` looks for attempts held long past their limit
MAX_MODELS_PER_NODE = 32  # model entries a node may hold (`health_scope: model`); see the module's docstring
MAX_MODEL_NAME = 200
ENDPOINT_FAILURES = frozenset({Outcome.CONNECT_ERROR, Outcome.RESET})  # the node's, whatever the model


class Lease(Protocol):
    node: NodeId

    def first_byte(self, ttfb_s: float | None, now: float) -> None:
        """The attempt passed the gate (a stream's first token): a success now; the lease stays held."""

    def release(self, outcome: Outcome, now: float, ttfb_s: float | None = None) -> None:
        """The attempt is over: frees the node's slot. Only the first call counts."""


class Leases(Protocol):
    async def acquire(self, node: NodeId, now: float, *, streamed: bool,
                      over_limit: bool = False, health: NodeId | None = None) -> Lease | None:
        """A lease on `node`, or None when it is at its limit (unless `over_limit`); its outcome is judged
        by the health entry `health` (a model's on the node), else by the node's own."""


class Node:
    def __init__(self, node_id: NodeId, upstream: Upstream, monitor: NodeMonitor) -> None:
        self.id = node_id
        self.upstream = upstream
        self.monitor = monitor
        self.limiter = NodeLimiter(LimitSettings.of(upstream))
        self.latency = LatencyStats()
        self.inflight = 0
        self.cluster_inflight = 0  # with shared state: every instance's attempts, as last seen
        self.shed = 0
        self.breaks = 0  # streams that broke after their first byte (stalls included)
        self.stalls = 0
        self.resumes = 0  # answers broken elsewhere that this node continued
        self.probes = 0  # active probes of this node while ejected
        self.half_open = False  # back after probing: one attempt at a time until one succeeds
        self.probe_failures = 0

    def has_room(self, now: float) -> bool:
        if self.half_open and self.inflight >= 1:
            return False
        limit = self.limiter.limit(now)
        return limit is None or self.inflight < limit

    def observe(self, outcome: Outcome, ttfb_s: float | None, now: float, streamed: bool) -> None:
        """What the limiter and the latency statistics learn from one outcome (the detector is told apart)."""
        if ttfb_s is not None:
            self.latency.add(now, ttfb_s)
        if outcome is Outcome.OK:
            self.half_open = False
        load = max(self.inflight, self.cluster_inflight)
        self.limiter.observe(outcome, ttfb_s, self.upstream.first_byte_timeout, load, streamed)

    def snapshot(self, now: float, interval: float) -> dict:
        m = self.monitor
        p50, p95 = self.latency.percentiles(now)
        health = health_snapshot(m, now, interval)
        return {
            "url": self.id.url,
            **health,
            "awaiting_probe": m.held,
            "half_open": self.half_open,
            "inflight": self.inflight,
            "ttfb_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttfb_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "ttfb_history_ms": self.latency.history(now),
            "limit": self.limiter.limit(now),
            "shed": self.shed,
            "breaks": self.breaks,
            "stalls": self.stalls,
            "resumes": self.resumes,
            "probes": self.probes,
            "probe_failures": self.probe_failures,
        }


def health_snapshot(m: NodeMonitor, now: float, interval: float) -> dict:
    """What one health entry (a node's own, or a model's on it) shows in `/status`."""
    ejected = m.is_ejected(now)
    return {
        "state": "ejected" if ejected else "healthy",
        "k": m.k,
        "ejections": m.ejections,
        "ejected_remaining_s": round(max(0.0, m.ejected_until - now), 3) if ejected and m.ejected_until else 0.0,
        "failure_rate": round(_shown_failure_rate(m, ejected), 2),
        "requests": m.requests,
        "failures": m.failures,
        "requests_per_s": round(m.last_interval_requests / interval, 2),
    }


def _shown_failure_rate(monitor: NodeMonitor, ejected: bool) -> float:
    """While ejected by the detector, the rate that caused it: the intervals since are empty (no traffic)."""
    if ejected and monitor.ejection_failure_rate is not None:
        return monitor.ejection_failure_rate
    return monitor.last_failure_rate


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
        self._set_probing()
        self._models: dict[NodeId, list[NodeId]] = {i: [] for i in ids}  # each node's model entries
        self._awaiting_verdict: set[LocalLease] = set()  # leases whose attempt has not been judged yet
        self._next_overdue_check = now

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, node: NodeId) -> Node:
        return self.nodes[node]

    def try_acquire(self, node: NodeId, now: float, *, streamed: bool, over_limit: bool = False,
                    health: NodeId | None = None) -> LocalLease | None:
        target = self.nodes[node]
        if not over_limit and not target.has_room(now):
            target.shed += 1
            return None
        target.inflight += 1
        lease = LocalLease(self, target, streamed, overdue_at=now + self._overdue_after(target.upstream, streamed),
                           health=health)
        self._awaiting_verdict.add(lease)
        return lease

    async def acquire(self, node: NodeId, now: float, *, streamed: bool, over_limit: bool = False,
                      health: NodeId | None = None) -> LocalLease | None:
        return self.try_acquire(node, now, streamed=streamed, over_limit=over_limit, health=health)

    def is_available(self, node: NodeId, now: float) -> bool:
        """`node` (a node, or a model's entry on one) is in rotation."""
        return self.detector.is_available(node, now)

    def health_entry(self, node: NodeId, requested_model: object, now: float) -> NodeId:
        """The health entry judging an attempt on `node` for a request that names `requested_model`.

        The node itself, unless its upstream's `health_scope` is `model`: then the entry of the model the
        upstream is sent, created on first use, within `MAX_MODELS_PER_NODE` (see the module's docstring).
        """
        upstream = self.nodes[node].upstream
        model = upstream.model or requested_model
        if upstream.health_scope != "model" or not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME:
            return node
        entry = node.for_model(model)
        if entry in self.detector.monitors:
            return entry
        entries = self._models[node]
        if len(entries) >= MAX_MODELS_PER_NODE:
            blank = next((e for e in entries if self.detector.monitors[e].blank), None)
            if blank is None:
                return node  # every entry holds state: this model is judged with the node's own
            self._forget(blank)
        entries.append(entry)
        self.detector.add(entry, now)
        return entry

    def model_entries(self, node: NodeId) -> list[NodeId]:
        return list(self._models.get(node, ()))

    def _forget(self, entry: NodeId) -> None:
        """Drop a blank model entry to make room for another."""
        self._models[entry.node].remove(entry)
        self.detector.remove(entry)

    def back_at(self, entry: NodeId) -> float:
        """When `entry` (and its node) is back in rotation by its timers, as far as known; 0: in rotation."""
        monitors = self.detector.monitors
        ends = [monitors[e].ejected_until for e in {entry, entry.node} if e in monitors]
        return max((end for end in ends if end is not None), default=0.0)

    def record(self, entry: NodeId, outcome: Outcome, ttfb_s: float | None, now: float, streamed: bool) -> None:
        """One counted outcome of an attempt judged by `entry` (a node, or a model's entry on one): for the
        detector, and for the node's limiter and latency."""
        for judged, failed in self._verdicts(entry, outcome, now):
            self._count(judged, failed, now)
        self.nodes[entry.node].observe(outcome, ttfb_s, now, streamed)

    def _verdicts(self, entry: NodeId, outcome: Outcome, now: float) -> list[tuple[NodeId, bool]]:
        """Which entries an outcome counts on, failed or not (see the module's docstring)."""
        if entry.model and entry not in self.detector.monitors:  # dropped while the attempt ran
            entry = self.health_entry(entry.node, entry.model, now)
        if not entry.model:
            return [(entry, outcome.failed)]
        if outcome in ENDPOINT_FAILURES:
            return [(entry.node, True)]
        return [(entry.node, False), (entry, outcome.failed)]

    def _count(self, entry: NodeId, failed: bool, now: float) -> None:
        self.detector.count(entry, failed, now)

    def advance(self, now: float) -> None:
        if now >= self._next_overdue_check:
            self._next_overdue_check = now + OVERDUE_CHECK_S
            for lease in [lease for lease in self._awaiting_verdict if lease.overdue_at <= now]:
                lease.overdue(now)
        self.detector.advance(now)

    def _overdue_after(self, upstream: Upstream, streamed: bool) -> float:
        """How long an attempt may go without a verdict before it counts as a timeout anyway.

        The gate's own timeouts judge every attempt well before this; it is the backstop for an attempt
        held past them (a hook stuck elsewhere), so that a node it hangs on is still ejected in time.
        """
        limit = upstream.first_byte_timeout if streamed else upstream.request_timeout
        return 2 * limit + self.profile.health_check.interval

    def eject(self, node: NodeId, now: float) -> None:
        self.detector.eject(node, now)

    def drain(self, node: NodeId, now: float, duration: float) -> None:
        self.detector.drain(node, now, duration)

    def restore(self, node: NodeId, now: float) -> None:
        """End the ejection of `node` now; of a node: of its model entries too."""
        for entry in [node, *self._models.get(node, ())]:
            self.detector.restore(entry, now)

    def reset(self, now: float) -> None:
        """Every node back in rotation with k = 1 and fresh counters; leases in flight stay held."""
        self.detector.reset(now)
        for node in self:
            node.monitor = self.detector.monitors[node.id]
        self._set_probing()

    def _set_probing(self) -> None:
        """With the profile's `probe` on, an ejection ends only once a probe of the node passes."""
        for node in self:
            node.monitor.probing = self.profile.probe.enabled
            node.monitor.early_return_after = self.profile.probe.early_return_after

    def probe_result(self, node: NodeId, passed: bool, now: float) -> None:
        target = self.nodes[node]
        target.probes += 1
        target.probe_failures += not passed
        self.detector.probe_result(node, passed, now)

    def snapshot(self, node: NodeId, now: float) -> dict:
        self.advance(now)
        target = self.nodes[node]
        interval = self.profile.health_check.interval
        snap = target.snapshot(now, interval)
        if target.upstream.health_scope == "model":
            snap["models"] = {e.model: health_snapshot(self.detector.monitors[e], now, interval)
                              for e in self._models[node]}
        return snap

    def _on_health_event(self, event: HealthEvent) -> None:
        self._node_follows(event)
        if self.listener:
            self.listener(event)

    def _node_follows(self, event: HealthEvent) -> None:
        """What the node itself takes from a health event: a return restarts its limit (slow start)."""
        if event.action == "uneject" and event.model is None:  # a model's return: its node never left
            node = self.nodes[NodeId(event.upstream, event.node)]
            node.limiter.returned(event.ts)
            node.half_open = self.profile.probe.enabled and event.by != "hand"


class LocalLease:
    """A lease in one process's pool; see the module's docstring for what each call counts."""

    def __init__(self, pool: NodePool, node: Node, streamed: bool, overdue_at: float = math.inf,
                 health: NodeId | None = None) -> None:
        self._pool = pool
        self._node = node
        self.node = node.id
        self.health = health or node.id  # the entry its outcome counts on: the node's, or a model's on it
        self.streamed = streamed
        self.overdue_at = overdue_at  # no verdict by then: counted as a timeout while still held
        self._judged = False
        self._overdue = False
        self.released = False

    def overdue(self, now: float) -> None:
        """Still no verdict long past its limit: a timeout of the node now, in this interval; not counted again."""
        if not self._judged and not self.released:
            self._overdue = True
            self._judge(Outcome.TIMEOUT, None, now)

    def first_byte(self, ttfb_s: float | None, now: float) -> None:
        if not self._judged and not self.released:
            self._judge(Outcome.OK, ttfb_s, now)

    def release(self, outcome: Outcome, now: float, ttfb_s: float | None = None) -> None:
        if self.released:
            return
        self.released = True
        passed_gate = self._judged and not self._overdue
        if not self._judged:
            self._judge(outcome, ttfb_s, now)
        elif passed_gate and outcome.failed:  # broke after its first byte
            self._count(outcome, None, now)
        if passed_gate and outcome.broke_stream:
            self._node.breaks += 1
            self._node.stalls += outcome is Outcome.STALLED
        self._node.inflight -= 1

    def _judge(self, outcome: Outcome, ttfb_s: float | None, now: float) -> None:
        self._judged = True
        self._pool._awaiting_verdict.discard(self)
        self._count(outcome, ttfb_s, now)

    def _count(self, outcome: Outcome, ttfb_s: float | None, now: float) -> None:
        if not outcome.ignored:
            self._pool.record(self.health, outcome, ttfb_s, now, self.streamed)
