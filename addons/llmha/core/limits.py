"""Concurrency limits per node: a fixed cap, a limit learned from time to first byte, slow start.

Ejection reacts after failures; a limit keeps a node from being overloaded at all. A node at its limit
refuses the lease of a new attempt (`nodes.py`), and the request goes to the next candidate at once (it is
"shed": counted, but not a failure of the node), so the primary never queues more work than it can
start promptly.

The adaptive limit is a gradient limiter in the family of Netflix's concurrency-limits `Gradient2`
and Envoy's adaptive-concurrency filter (https://github.com/Netflix/concurrency-limits,
https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/adaptive_concurrency_filter),
with the time to first token of streamed answers as the latency signal. For an LLM server TTFB is
queueing for a batch slot plus the decode step in progress plus prefill, so even a full batch with
nobody queued shows 2-3x the unloaded minimum; the limiter therefore aims at a target that also
respects the first-byte timeout:

    target   = max(tolerance * ttfb_min, first_byte_timeout / 2)     (tolerance = 2)
    smoothed = 0.8 * smoothed + 0.2 * ttfb                            (per sample)
    gradient = clamp(target / smoothed, 0.5, 1.0)
    limit    = 0.8 * limit + 0.2 * (limit * gradient + headroom)     (clamped to [min, max])

with headroom = sqrt(limit) under the target (gradient 1), else 0: while TTFB stays under the target
the limit grows by sqrt(limit)/5 per sample; above it, it shrinks by up to a tenth per sample. Only
streamed first tokens are samples (a non-streamed answer's first byte comes when it is complete, and
a fast `GET /v1/models` would make the minimum meaningless);
a timeout counts as a sample at the timeout, and other failures halve the gradient. Samples taken
while fewer than half the limit were in flight do not grow it: an idle node proves nothing about its
capacity. The limit starts at `min_inflight`, as TCP does; `ttfb_min` is re-learned every
`probe_every` samples, so a permanently slower model is not punished forever.

Slow start: for `slow_start` seconds after a node returns from ejection its limit ramps linearly
from `min_inflight` up to its learned (or fixed) limit, so it is not flattened by a thundering herd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .profile import Upstream
from .types import Outcome


@dataclass(frozen=True)
class LimitSettings:
    max_inflight: int | None = None  # None: no cap
    adaptive: bool = False
    min_inflight: int = 1
    slow_start: float = 0.0  # seconds
    probe_every: int = 1000
    tolerance: float = 2.0
    smoothing: float = 0.2

    @classmethod
    def of(cls, upstream: Upstream) -> LimitSettings:
        return cls(upstream.max_inflight, upstream.adaptive, upstream.min_inflight, upstream.slow_start)


class NodeLimiter:
    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.learned = float(settings.min_inflight if settings.adaptive else settings.max_inflight or 0)
        self.ttfb_min: float | None = None
        self.smoothed: float | None = None
        self.samples = 0
        self.returned_at: float | None = None

    def limit(self, now: float) -> int | None:
        """The number of attempts this node may have in flight now; None: unlimited."""
        s = self.settings
        if s.max_inflight is None and not s.adaptive:
            full = None
        else:
            full = max(s.min_inflight, int(self.learned))
        if full is None or self.returned_at is None or s.slow_start <= 0 or now - self.returned_at >= s.slow_start:
            return full
        ramp = (now - self.returned_at) / s.slow_start
        return max(s.min_inflight, int(s.min_inflight + (full - s.min_inflight) * ramp))

    def returned(self, at: float) -> None:
        self.returned_at = at

    def observe(self, outcome: Outcome, ttfb: float | None, timeout: float | None, inflight: int,
                streamed: bool = True) -> None:
        """One finished attempt; `timeout` is its first-byte limit (the latency the target respects)."""
        if not self.settings.adaptive:
            return
        if outcome is Outcome.TIMEOUT:
            ttfb = timeout
        elif outcome.failed:
            self._update(0.5)
            return
        if ttfb is None or not streamed or timeout is None:
            return
        self.samples += 1
        if self.ttfb_min is None or ttfb < self.ttfb_min or self.samples % self.settings.probe_every == 0:
            self.ttfb_min = ttfb
        s = self.settings.smoothing
        self.smoothed = ttfb if self.smoothed is None else (1 - s) * self.smoothed + s * ttfb
        target = max(self.settings.tolerance * self.ttfb_min, timeout / 2)
        gradient = min(1.0, max(0.5, target / self.smoothed))
        if gradient >= 1.0 and inflight * 2 < self.learned:
            return  # not using half its limit: no evidence it could take more
        self._update(gradient)

    def _update(self, gradient: float) -> None:
        limit = self.learned
        headroom = math.sqrt(limit) if gradient >= 1.0 else 0.0  # grow only when under target
        s = self.settings.smoothing
        self._set((1 - s) * limit + s * (limit * gradient + headroom))

    def _set(self, value: float) -> None:
        s = self.settings
        top = s.max_inflight if s.max_inflight is not None else math.inf
        self.learned = min(top, max(float(s.min_inflight), value))
