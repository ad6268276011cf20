"""Candidate choice: the ordered list of nodes one request may try.

Upstreams are tried in profile order: first the primary's nodes in rotation, then each fallback's.
Within an upstream, nodes are ordered least-in-flight first; ties are broken round-robin, so idle
nodes share the load evenly and a node busy with slow streams gets fewer new ones.

When every node of every upstream is ejected, failing outright would serve nobody, so the request
tries all nodes anyway, the one whose ejection ends first leading (Envoy's "panic" routing).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .health import HealthTracker, Node
from .limits import LimitSettings, LimitTracker
from .profile import Profile, Upstream


@dataclass(frozen=True)
class Candidate:
    upstream: Upstream
    node: Node
    is_primary: bool  # of the profile's first upstream, the one the client addresses


class CandidatePicker:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._turns = {u.name: itertools.count() for u in profile.upstreams}
        self.limits = LimitTracker({
            Node(u.name, url): LimitSettings(u.max_inflight, u.adaptive, u.min_inflight, u.slow_start)
            for u in profile.upstreams for url in u.nodes})

    def all_nodes(self) -> list[Node]:
        return [Node(u.name, url) for u in self.profile.upstreams for url in u.nodes]

    def candidates(self, tracker: HealthTracker, now: float) -> list[Candidate]:
        in_rotation = [c for u in self.profile.upstreams for c in self._upstream_order(u, tracker, now)]
        chosen = self._within_limits(in_rotation, tracker, now) or in_rotation
        if not chosen:
            chosen = self._panic_order(tracker)
        if not self.profile.transparent_failover:
            chosen = chosen[:1]
        return chosen

    def _within_limits(self, candidates: list[Candidate], tracker: HealthTracker, now: float) -> list[Candidate]:
        """Drop nodes at their concurrency limit, counting the request as shed there.

        If every node is at its limit, the caller keeps them all: queueing somewhere beats failing.
        """
        kept = []
        for c in candidates:
            if self.limits.has_room(c.node, tracker.monitors[c.node].inflight, now):
                kept.append(c)
            else:
                self.limits.shed(c.node)
        return kept

    def _upstream_order(self, upstream: Upstream, tracker: HealthTracker, now: float) -> list[Candidate]:
        nodes = [Node(upstream.name, url) for url in upstream.nodes]
        available = [n for n in nodes if tracker.is_available(n, now)]
        if not available:
            return []
        start = next(self._turns[upstream.name]) % len(nodes)
        rotation = {n: (i - start) % len(nodes) for i, n in enumerate(nodes)}
        available.sort(key=lambda n: (tracker.monitors[n].inflight, rotation[n]))
        return [self._candidate(upstream, n) for n in available]

    def _panic_order(self, tracker: HealthTracker) -> list[Candidate]:
        by_name = {u.name: u for u in self.profile.upstreams}
        nodes = sorted(self.all_nodes(), key=lambda n: tracker.monitors[n].ejected_until or 0.0)
        return [self._candidate(by_name[n.upstream], n) for n in nodes]

    def _candidate(self, upstream: Upstream, node: Node) -> Candidate:
        return Candidate(upstream, node, is_primary=upstream is self.profile.upstreams[0])
