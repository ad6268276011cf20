"""Retry discipline in the pure core, on a fake clock: pacing, the retry budget, the deadline, probing."""

from __future__ import annotations

import pytest

from llmha.core.health import OutlierDetector
from llmha.core.profile import HealthCheck, ProfileError, RetryBudgetSettings, parse_profile
from llmha.core.retry import Pacing, Probe, RetryBudget, attempt_limit
from llmha.core.types import NodeId, Outcome

NODE = NodeId("primary", "http://127.0.0.1:1")


def test_pacing_holds_a_node_until_its_retry_after_and_keeps_the_latest():
    pacing = Pacing()
    assert pacing.ready(NODE, 100.0)
    pacing.note(NODE, 2.0, now=100.0)
    assert not pacing.ready(NODE, 101.9) and pacing.wait_s(NODE, 101.0) == pytest.approx(1.0)
    pacing.note(NODE, 0.5, now=100.5)  # a shorter wait does not cut the first one short
    assert pacing.wait_s(NODE, 101.5) == pytest.approx(0.5)
    assert pacing.ready(NODE, 102.0)


def test_budget_allows_the_floor_then_a_percentage_of_requests_in_the_window():
    budget = RetryBudget(RetryBudgetSettings(percent=20, min_per_s=0.2, window=10))  # floor: 2 per window
    for _ in range(10):
        budget.request(0.0)
    allowed = 0
    while budget.allows_retry(1.0):
        budget.retried(1.0)
        allowed += 1
    assert allowed == 4  # 2 + 20% of 10
    assert (budget.retries, budget.denied) == (4, 1)


def test_budget_window_slides():
    budget = RetryBudget(RetryBudgetSettings(percent=0, min_per_s=0.1, window=10))  # one retry per 10 s
    assert budget.allows_retry(0.0)
    budget.retried(0.0)
    assert not budget.allows_retry(9.9)
    assert budget.allows_retry(10.0)


def test_budget_window_keeps_only_its_window_of_requests_when_nobody_asks():
    """A retry budget that is never asked (no retries, no /status) must not keep every request's time."""
    budget = RetryBudget(RetryBudgetSettings(percent=20, min_per_s=1, window=10))
    for i in range(100_000):
        budget.request(i * 0.01)  # 100 requests/s for 1,000 s
    assert len(budget._requests) <= 1001


def test_attempt_limit_is_the_smaller_of_its_own_and_what_is_left_of_the_deadline():
    assert attempt_limit(0.2, started=100.0, deadline=None, now=105.0) == 0.2
    assert attempt_limit(0.2, started=100.0, deadline=1.0, now=100.3) == 0.2
    assert attempt_limit(0.2, started=100.0, deadline=1.0, now=100.9) == pytest.approx(0.1)
    assert attempt_limit(0.2, started=100.0, deadline=1.0, now=101.5) <= 0


def test_probe_schedule():
    probe = Probe(next_at=10.0)
    assert not probe.due(9.0) and probe.due(10.0)
    probe.start()
    assert not probe.due(11.0)  # one at a time
    probe.finish(True, 11.0, interval=1.0)
    assert probe.passes_in_a_row == 1 and probe.due(12.0)
    probe.start()
    probe.finish(False, 12.0, interval=1.0)
    assert probe.passes_in_a_row == 0


def detector(early: int = 0) -> OutlierDetector:
    events = []
    d = OutlierDetector(HealthCheck(interval=1.0, base_ejection_time=10.0, max_ejection_time=100.0), [NODE], 0.0,
                        events.append)
    d.monitors[NODE].probing = True
    d.monitors[NODE].early_return_after = early
    d.events = events  # type: ignore[attr-defined]
    d.record(NODE, Outcome.TIMEOUT, 0.5)
    d.advance(1.0)  # ejected at 1.0 until 11.0, k=1
    return d


def test_an_ejection_ends_only_after_a_probe_passes_and_k_does_not_grow_meanwhile():
    d = detector()
    monitor = d.monitors[NODE]
    d.probe_result(NODE, False, 5.0)
    assert not d.is_available(NODE, 11.0)  # time is up, but the last probe failed: held
    assert [e.action for e in d.events] == ["eject", "hold"]
    d.probe_result(NODE, False, 20.0)
    assert not d.is_available(NODE, 30.0) and monitor.next_k == 2 and monitor.ejections == 1
    d.probe_result(NODE, True, 31.0)
    assert d.is_available(NODE, 31.0)
    assert [e.action for e in d.events] == ["eject", "hold", "uneject"]


def test_a_node_whose_last_probe_passed_returns_at_the_end_of_its_ejection_not_before():
    d = detector()
    d.probe_result(NODE, True, 5.0)
    assert not d.is_available(NODE, 10.9)
    assert d.is_available(NODE, 11.0)
    assert [e.action for e in d.events] == ["eject", "uneject"]


def test_early_return_after_n_passes_in_a_row_is_opt_in():
    d = detector(early=3)
    for t in (2.0, 3.0):
        d.probe_result(NODE, True, t)
    d.probe_result(NODE, False, 4.0)
    d.probe_result(NODE, True, 5.0)
    d.probe_result(NODE, True, 6.0)
    assert not d.is_available(NODE, 6.5)
    d.probe_result(NODE, True, 7.0)
    assert d.is_available(NODE, 7.0)
    assert d.events[-1].action == "uneject" and d.events[-1].by == "probe"


def test_without_probing_an_ejection_ends_blind():
    d = detector()
    d.monitors[NODE].probing = False
    assert d.is_available(NODE, 11.0)


def profile(**top) -> dict:
    return {**top, "upstreams": [{"name": "primary", "nodes": ["http://127.0.0.1:1"]}]}


def test_profile_keys_and_defaults():
    p = parse_profile(profile(), "p.yaml", {}, None)
    u = p.upstreams[0]
    assert (p.retry_after_max, p.retry_budget.percent, u.request_deadline, u.failover_on, u.max_attempts) == \
        (2.0, 20.0, None, (), 3)
    assert (p.probe.enabled, p.probe.method, p.probe.path, p.probe.early_return_after) == (True, "GET", "/v1/models", 0)
    p = parse_profile({"request_deadline": "5s", "probe": {"path": "/health", "body": {"a": 1}},
                       "upstreams": [{"name": "a", "nodes": ["http://h:1"], "request_deadline": "1s",
                                      "failover_on": ["context_length_exceeded"]},
                                     {"name": "b", "nodes": ["http://h:2"]}]}, "p.yaml", {}, None)
    assert [u.request_deadline for u in p.upstreams] == [1.0, 5.0]
    assert p.upstreams[0].failover_on == ("context_length_exceeded",) and p.probe.body == '{"a": 1}'


@pytest.mark.parametrize("top, message", [
    ({"retry_budget": {"percent": 120}}, "retry_budget.percent"),
    ({"request_deadline": "soon"}, "request_deadline: bad duration"),
    ({"probe": {"path": "v1/models"}}, "probe.path"),
    ({"max_attempts_per_upstream": 0}, "max_attempts_per_upstream: needs a whole number"),
])
def test_bad_retry_keys_are_refused_in_one_line(top, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(profile(**top), "p.yaml", {}, None)


def test_a_node_back_from_probing_takes_one_attempt_at_a_time_until_one_succeeds():
    from llmha.core.nodes import NodePool

    p = parse_profile(profile(health_check={"interval": 1, "base_ejection_time": 10}), "p.yaml", {}, None)
    node = NodeId("primary", "http://127.0.0.1:1")
    pool = NodePool(p, 0.0)
    pool.try_acquire(node, 0.5, streamed=True).release(Outcome.TIMEOUT, 0.5)
    pool.advance(1.0)
    assert not pool.is_available(node, 1.0)
    pool.probe_result(node, True, 5.0)
    assert pool.is_available(node, 11.0) and pool[node].half_open
    first = pool.try_acquire(node, 11.0, streamed=True)
    assert first is not None and pool.try_acquire(node, 11.0, streamed=True) is None, "half-open: one at a time"
    first.first_byte(0.1, 11.1)
    assert not pool[node].half_open and pool.try_acquire(node, 11.2, streamed=True) is not None
