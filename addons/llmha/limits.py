"""Concurrency limits per node: a fixed cap, a limit learned from time to first byte, slow start.

Ejection reacts after failures; a limit keeps a node from being overloaded at all. A request that
would take a node past its limit goes to the next candidate at once (it is "shed": counted, but not a
failure of the node), so the primary never queues more work than it can start promptly.

The adaptive limit is TCP Vegas as Netflix's concurrency-limits library applies it to servers
(`VegasLimit`, https://github.com/Netflix/concurrency-limits), with time to first byte as the round
trip: for an LLM server, TTFB above its unloaded minimum is time spent queueing for a batch slot.
Per sample, with `ttfb_min` the lowest TTFB seen (re-learned every `probe_every` samples, so a
permanently slower model is not punished forever):

    queue = limit * (1 - ttfb_min / ttfb)           # requests estimated to be waiting
    queue <= threshold  -> limit += 3 * log10(limit)   (grow fast while nothing queues)
    queue <  alpha      -> limit += log10(limit)
    queue >  beta       -> limit -= log10(limit)

with Vegas's threshold, alpha, beta = log10(limit), 3 log10(limit), 6 log10(limit) (log10 here at
least 1). One GPU serves a handful of sequences at once, and at such small limits those thresholds
would never let the limit shrink (6 queued out of 5 cannot happen), so each is capped at a share of
the limit: 1/8, 1/4 and 1/2. In TTFB terms, at any small limit: shrink when TTFB is above twice its
minimum, grow when below 4/3 of it.

The result is clamped to [min_inflight, max_inflight]. Samples taken while fewer than half the limit
were in flight do not grow it: an idle node proves nothing about its capacity. A timed-out attempt
counts as a sample at the timeout, a failure that never measured a TTFB as a sign of overload
(limit shrinks by its log10). The limit starts at `min_inflight`, as TCP does.

Slow start: for `slow_start` seconds after a node returns from ejection its limit ramps linearly
from `min_inflight` up to its learned (or fixed) limit, so it is not flattened by a thundering herd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .health import Node, Outcome


@dataclass(frozen=True)
class LimitSettings:
    max_inflight: int | None = None  # None: no cap
    adaptive: bool = False
    min_inflight: int = 1
    slow_start: float = 0.0  # seconds
    probe_every: int = 1000



def _log10(limit: float) -> float:
    return max(1.0, math.log10(max(limit, 1.0)))


class NodeLimiter:
    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.learned = float(settings.min_inflight if settings.adaptive else settings.max_inflight or 0)
        self.ttfb_min: float | None = None
        self.samples = 0
        self.returned_at: float | None = None
        self.shed = 0

    def limit(self, now: float) -> int | None:
        """The number of attempts this node may have in flight now; None: unlimited."""
        s = self.settings
        if s.max_inflight is None and not s.adaptive:
            full = None
        else:
            full = max(s.min_inflight, int(self.learned))
        if self.returned_at is None or s.slow_start <= 0 or now - self.returned_at >= s.slow_start:
            return full
        ramp = (now - self.returned_at) / s.slow_start
        return max(s.min_inflight, int(s.min_inflight + (full - s.min_inflight) * ramp))

    def returned(self, at: float) -> None:
        self.returned_at = at

    def observe(self, outcome: Outcome, ttfb: float | None, timeout: float | None, inflight: int) -> None:
        if not self.settings.adaptive:
            return
        if ttfb is None and outcome is Outcome.TIMEOUT:
            ttfb = timeout
        if ttfb is None:
            if outcome.failed:
                self._set(self.learned - _log10(self.learned))
            return
        self.samples += 1
        if self.ttfb_min is None or ttfb < self.ttfb_min or self.samples % self.settings.probe_every == 0:
            self.ttfb_min = ttfb
        self._vegas(ttfb, inflight)

    def _vegas(self, ttfb: float, inflight: int) -> None:
        limit = self.learned
        queue = limit * (1 - self.ttfb_min / ttfb) if ttfb > 0 else 0.0
        step = _log10(limit)
        threshold, alpha, beta = min(step, limit / 8), min(3 * step, limit / 4), min(6 * step, limit / 2)
        if queue > beta:
            self._set(limit - step)
        elif inflight * 2 < limit:
            return  # not using half its limit: no evidence it could take more
        elif queue <= threshold:
            self._set(limit + 3 * step)
        elif queue < alpha:
            self._set(limit + step)

    def _set(self, value: float) -> None:
        s = self.settings
        top = s.max_inflight if s.max_inflight is not None else math.inf
        self.learned = min(top, max(float(s.min_inflight), value))


class LimitTracker:
    """Every node's limiter."""

    def __init__(self, settings_by_node: dict[Node, LimitSettings]) -> None:
        self.limiters = {node: NodeLimiter(s) for node, s in settings_by_node.items()}

    def has_room(self, node: Node, inflight: int, now: float) -> bool:
        limit = self.limiters[node].limit(now)
        return limit is None or inflight < limit

    def shed(self, node: Node) -> None:
        self.limiters[node].shed += 1

    def observe(self, node: Node, outcome: Outcome, ttfb: float | None, timeout: float | None,
                inflight: int) -> None:
        self.limiters[node].observe(outcome, ttfb, timeout, inflight)

    def returned(self, node: Node, at: float) -> None:
        self.limiters[node].returned(at)

    def status(self, node: Node, now: float) -> dict:
        limiter = self.limiters[node]
        return {"limit": limiter.limit(now), "shed": limiter.shed}
