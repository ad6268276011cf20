"""Candidate choice: the ordered list of nodes one request may try.

Upstreams are tried in profile order: first the primary's nodes in rotation, then each fallback's.
Within an upstream, nodes are ordered least-in-flight first; ties are broken round-robin, so idle
nodes share the load evenly and a node busy with slow streams gets fewer new ones.

When every node of every upstream is ejected, failing outright would serve nobody, so the request
tries all nodes anyway, the one whose ejection ends first leading (Envoy's "panic" routing).

Concurrency limits are not judged here: the gate asks each node for a lease at the moment it tries
it (`nodes.py`), so a node's room is never stale.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .nodes import NodePool
from .profile import Profile, Upstream
from .types import NodeId


@dataclass(frozen=True)
class Candidate:
    upstream: Upstream
    node: NodeId
    is_primary: bool  # of the profile's first upstream, the one the client addresses


class CandidatePicker:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._turns = {u.name: itertools.count() for u in profile.upstreams}

    def candidates(self, pool: NodePool, now: float) -> list[Candidate]:
        pool.advance(now)
        in_rotation = [c for u in self.profile.upstreams for c in self._upstream_order(u, pool, now)]
        return in_rotation or self._panic_order(pool)

    def _upstream_order(self, upstream: Upstream, pool: NodePool, now: float) -> list[Candidate]:
        nodes = [NodeId(upstream.name, url) for url in upstream.nodes]
        available = [n for n in nodes if pool.is_available(n, now)]
        if not available:
            return []
        start = next(self._turns[upstream.name]) % len(nodes)
        rotation = {n: (i - start) % len(nodes) for i, n in enumerate(nodes)}
        available.sort(key=lambda n: (pool[n].inflight, rotation[n]))
        return [self._candidate(upstream, n) for n in available]

    def _panic_order(self, pool: NodePool) -> list[Candidate]:
        by_name = {u.name: u for u in self.profile.upstreams}
        nodes = sorted(pool.nodes, key=lambda n: pool[n].monitor.ejected_until or 0.0)
        return [self._candidate(by_name[n.upstream], n) for n in nodes]

    def _candidate(self, upstream: Upstream, node: NodeId) -> Candidate:
        return Candidate(upstream, node, is_primary=upstream is self.profile.upstreams[0])
