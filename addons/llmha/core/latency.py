"""Latency statistics per node: time to first byte over the last minute, and a per-second history.

Kept beside the outlier detector, not inside it (as Envoy's detector ignores latency): the status,
the panel and the adaptive limiter read these figures; ejection does not.
"""

from __future__ import annotations

import math
from collections import deque

TTFB_WINDOW_S = 60.0
TTFB_SAMPLES_KEPT = 4096


class LatencyStats:
    def __init__(self) -> None:
        self.ttfb_samples: deque[tuple[float, float]] = deque(maxlen=TTFB_SAMPLES_KEPT)

    def add(self, now: float, ttfb: float) -> None:
        self.ttfb_samples.append((now, ttfb))

    def percentiles(self, now: float) -> tuple[float | None, float | None]:
        """TTFB p50 and p95 (seconds) over the last minute."""
        recent = sorted(t for ts, t in self.ttfb_samples if now - ts <= TTFB_WINDOW_S)
        if not recent:
            return None, None
        return percentile(recent, 50), percentile(recent, 95)

    def history(self, now: float, seconds: int = 60) -> list[float | None]:
        """Median TTFB (ms) per second over the last `seconds`, oldest first."""
        per_second: list[list[float]] = [[] for _ in range(seconds)]
        for ts, ttfb in self.ttfb_samples:
            age = int(now - ts)
            if 0 <= age < seconds:
                per_second[seconds - 1 - age].append(ttfb)
        return [round(percentile(sorted(s), 50) * 1000, 1) if s else None for s in per_second]


def percentile(sorted_values: list[float], pct: float) -> float:
    rank = (len(sorted_values) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)
