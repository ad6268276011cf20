"""Candidate choice: the ordered list of nodes one request may try.

Upstreams are tried in profile order: first the primary's nodes in rotation, then each fallback's.
Within an upstream, nodes are ordered least-in-flight first; ties are broken round-robin, so idle
nodes share the load evenly and a node busy with slow streams gets fewer new ones.

When every node of every upstream is ejected, failing outright would serve nobody, so the request
tries all nodes anyway, the one whose ejection ends first leading (Envoy's "panic" routing).

With `health_scope: model` (`nodes.py`), a node is a candidate for a request only while both the node
and the entry of the request's model on it are in rotation; the candidate carries that entry, which
judges the attempt.

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
    model_entry: NodeId | None = None  # `health_scope: model`: the request's model's health entry on the node

    @property
    def health(self) -> NodeId:
        """The health entry that judges an attempt on this candidate (and that its `Retry-After` paces)."""
        return self.model_entry or self.node


class CandidatePicker:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._turns = {u.name: itertools.count() for u in profile.upstreams}
        self._nodes = {u.name: [NodeId(u.name, url) for url in u.nodes] for u in profile.upstreams}

    def candidates(self, pool: NodePool, now: float, model: object = None) -> list[Candidate]:
        """The candidates of a request naming `model` (its JSON body's `model`, as sent; None: unknown)."""
        pool.advance(now)
        in_rotation = [c for u in self.profile.upstreams for c in self._upstream_order(u, pool, now, model)]
        return in_rotation or self._panic_order(pool, now, model)

    def _upstream_order(self, upstream: Upstream, pool: NodePool, now: float, model: object) -> list[Candidate]:
        nodes = self._nodes[upstream.name]
        available = [n for n in nodes if pool.is_available(n, now)]
        entries: dict[NodeId, NodeId] = {}
        if upstream.health_scope == "model":
            entries = {n: pool.health_entry(n, model, now) for n in available}
            available = [n for n in available if pool.is_available(entries[n], now)]
        if not available:
            return []
        start = next(self._turns[upstream.name]) % len(nodes)
        rotation = {n: (i - start) % len(nodes) for i, n in enumerate(nodes)}
        available.sort(key=lambda n: (pool[n].inflight, rotation[n]))
        return [self._candidate(upstream, n, entries.get(n)) for n in available]

    def _panic_order(self, pool: NodePool, now: float, model: object) -> list[Candidate]:
        by_name = {u.name: u for u in self.profile.upstreams}
        entries = {n: pool.health_entry(n, model, now) for n in pool.nodes}
        nodes = sorted(pool.nodes, key=lambda n: pool.back_at(entries[n]))
        return [self._candidate(by_name[n.upstream], n, entries[n]) for n in nodes]

    def _candidate(self, upstream: Upstream, node: NodeId, entry: NodeId | None = None) -> Candidate:
        return Candidate(upstream, node, is_primary=upstream is self.profile.upstreams[0],
                         model_entry=entry if entry is not None and entry.model else None)
