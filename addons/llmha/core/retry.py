"""Retry discipline: how many attempts one request may make, when, and within what time.

Pure: every call takes `now` (unix seconds); the gate (`proxy/gate.py`) asks, the runtime probes.

- `Pacing`: a node that answered 429 or 503 with `Retry-After` is not tried again before then
  ("not before T"). This is not an ejection and counts nothing: the answer itself was counted once.
- `RetryBudget` (Finagle's RetryBudget, Envoy's retry_budget): the attempts on an upstream past a
  request's first one are retries; over a sliding window they may be at most `percent` of the
  upstream's requests, plus a floor of `min_per_s` a second. Past the budget the request goes
  straight on to the next upstream, so an overloaded primary with many nodes gets one attempt per
  request, not one per node.
- `attempt_limit`: an attempt's own limit, cut to what is left of the request's `request_deadline`.
- `Probe`: the state of one ejected node's active probing (when the next probe is due, how many
  passed in a row), driven by the runtime; the detector (`health.py`) decides what a result means.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .profile import Profile, RetryBudgetSettings
from .types import NodeId


class Pacing:
    """Each node's "not before T" from its last `Retry-After`."""

    def __init__(self) -> None:
        self._not_before: dict[NodeId, float] = {}

    def note(self, node: NodeId, retry_after_s: float, now: float) -> None:
        if len(self._not_before) >= 256:  # keyed by model entries too (`health_scope: model`): keep it small
            self._not_before = {n: t for n, t in self._not_before.items() if t > now}
        self._not_before[node] = max(self._not_before.get(node, 0.0), now + retry_after_s)

    def wait_s(self, node: NodeId, now: float) -> float:
        """How long `node` still asks to be left alone (0: it may be tried now)."""
        return max(0.0, self._not_before.get(node, 0.0) - now)

    def ready(self, node: NodeId, now: float) -> bool:
        return self.wait_s(node, now) <= 0


class RetryBudget:
    """One upstream's retry budget over a sliding window."""

    def __init__(self, settings: RetryBudgetSettings) -> None:
        self.settings = settings
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.retries = 0  # retries allowed so far
        self.denied = 0  # retries refused: the request went on to the next upstream

    def request(self, now: float) -> None:
        """A request's first attempt on this upstream."""
        self._expire(now)  # here too, not only when asked: a window nobody reads must not grow
        self._requests.append(now)

    def allows_retry(self, now: float) -> bool:
        """May a request make one more attempt here? A refusal is counted; the retry, once made (`retried`)."""
        allowed = self.allowed(now)  # expires the window first
        if len(self._retries) < allowed:
            return True
        self.denied += 1
        return False

    def retried(self, now: float) -> None:
        self._retries.append(now)
        self.retries += 1

    def allowed(self, now: float) -> float:
        """Retries the window allows now: the floor plus `percent` of its requests."""
        self._expire(now)
        s = self.settings
        return s.min_per_s * s.window + s.percent / 100 * len(self._requests)

    def _expire(self, now: float) -> None:
        for times in (self._requests, self._retries):
            while times and times[0] <= now - self.settings.window:
                times.popleft()


class RetryDiscipline:
    """What the gate consults before each attempt: the nodes' pacing and the upstreams' retry budgets."""

    def __init__(self, profile: Profile | None = None) -> None:
        self.pacing = Pacing()
        self.budgets: dict[str, RetryBudget] = {}
        self.retry_after_max = 0.0
        if profile is not None:
            self.budgets = {u.name: RetryBudget(profile.retry_budget) for u in profile.upstreams}
            self.retry_after_max = profile.retry_after_max

    def budget(self, upstream: str) -> RetryBudget | None:
        """None: no budget (a gate without a profile's discipline)."""
        return self.budgets.get(upstream)

    def describe(self, upstream: str, now: float) -> dict:
        """The upstream's budget for `/status`."""
        budget = self.budgets.get(upstream)
        if budget is None:
            return {}
        return {"retries": budget.retries, "retries_denied": budget.denied,
                "retries_allowed_now": round(budget.allowed(now) - len(budget._retries), 2)}


def attempt_limit(own_limit: float, started: float, deadline: float | None, now: float) -> float:
    """An attempt's time limit: its own, or what is left of the request's deadline if that is less (<= 0: none)."""
    if deadline is None:
        return own_limit
    return min(own_limit, deadline - (now - started))


@dataclass
class Probe:
    """Active probing of one ejected node: when the next probe is due and how many passed in a row."""

    next_at: float
    passes_in_a_row: int = 0
    in_flight: bool = False
    last_passed: bool | None = None  # the previous probe's result; None before the first

    def due(self, now: float) -> bool:
        return not self.in_flight and now >= self.next_at

    def start(self) -> None:
        self.in_flight = True

    def finish(self, passed: bool, now: float, interval: float) -> bool:
        """Note a result; True when it differs from the previous one (worth an event)."""
        changed = passed != self.last_passed
        self.last_passed = passed
        self.in_flight = False
        self.passes_in_a_row = self.passes_in_a_row + 1 if passed else 0
        self.next_at = now + interval
        return changed
