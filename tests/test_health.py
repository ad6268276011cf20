"""The outlier detector with a fake clock: exact times, the reference values unshortened."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmha.core.candidates import CandidatePicker
from llmha.core.health import HealthEvent, OutlierDetector
from llmha.core.nodes import NodePool
from llmha.core.profile import HealthCheck, Profile, Upstream
from llmha.core.types import NodeId, Outcome

T0 = 1_000_000.0
REFERENCE = HealthCheck(failure_rate_threshold=50, interval=1, base_ejection_time=30, max_ejection_time=300)
PRIMARY = NodeId("primary", "http://127.0.0.1:8001")
FALLBACK = NodeId("fallback", "http://127.0.0.1:8002")


class Detector(OutlierDetector):
    """The detector with its state changes collected, as a listener would see them."""

    def __init__(self, config: HealthCheck, nodes: list[NodeId], now: float) -> None:
        self.seen: list[HealthEvent] = []
        super().__init__(config, nodes, now, self.seen.append)

    def snapshot(self, node: NodeId, now: float) -> dict:
        self.advance(now)
        m = self.monitors[node]
        ejected = m.is_ejected(now)
        return {"state": "ejected" if ejected else "healthy", "k": m.k, "ejections": m.ejections,
                "ejected_remaining_s": m.ejected_until - now if ejected else 0.0,
                "failure_rate": m.last_failure_rate}

    def take_events(self) -> list[HealthEvent]:
        seen, self.seen[:] = list(self.seen), []
        return seen


def tracker(config=REFERENCE, nodes=(PRIMARY, FALLBACK)) -> Detector:
    return Detector(config, list(nodes), T0)


def outcomes(t: Detector, node: NodeId, at: float, ok: int, failed: int) -> None:
    for _ in range(ok):
        t.record(node, Outcome.OK, at)
    for _ in range(failed):
        t.record(node, Outcome.TIMEOUT, at)


def events(t: Detector, now: float) -> list[tuple]:
    t.advance(now)
    return [(e.action, e.ts - T0, e.k, e.duration_s) for e in t.take_events()]


def pool(config=REFERENCE) -> NodePool:
    profile = Profile(path="h.yaml", health_check=config, upstreams=(
        Upstream("primary", (PRIMARY.url,)), Upstream("fallback", (FALLBACK.url,))))
    return NodePool(profile, T0)


def test_threshold_exactly_met_ejects_at_the_interval_boundary():
    t = tracker()
    outcomes(t, PRIMARY, T0 + 0.5, ok=2, failed=2)  # 50 % == threshold
    assert t.is_available(PRIMARY, T0 + 0.99)
    assert events(t, T0 + 1.0) == [("eject", 1.0, 1, 30)]
    assert not t.is_available(PRIMARY, T0 + 1.0)
    assert t.snapshot(PRIMARY, T0 + 1.0)["failure_rate"] == 50


def test_just_below_the_threshold_does_not_eject():
    t = tracker(HealthCheck(failure_rate_threshold=50.01, interval=1, base_ejection_time=30))
    outcomes(t, PRIMARY, T0 + 0.5, ok=2, failed=2)
    assert events(t, T0 + 5) == []
    assert t.is_available(PRIMARY, T0 + 5)


def test_min_requests_not_met():
    t = tracker(HealthCheck(interval=1, base_ejection_time=30, min_requests=5))
    outcomes(t, PRIMARY, T0 + 0.5, ok=0, failed=4)
    assert events(t, T0 + 2) == []
    outcomes(t, PRIMARY, T0 + 2.5, ok=0, failed=5)
    assert events(t, T0 + 3) == [("eject", 3.0, 1, 30)]


def test_outcomes_count_in_the_interval_they_happen_in():
    t = tracker()
    outcomes(t, PRIMARY, T0 + 0.9, ok=0, failed=1)
    outcomes(t, PRIMARY, T0 + 1.1, ok=3, failed=0)  # closes the first interval first: ejected at 1.0
    assert events(t, T0 + 1.2) == [("eject", 1.0, 1, 30)]


def test_k_grows_over_three_ejections_30_60_90_with_the_reference_values():
    t = tracker()
    outcomes(t, PRIMARY, T0 + 0.5, ok=0, failed=1)
    assert events(t, T0 + 1) == [("eject", 1.0, 1, 30)]
    assert t.snapshot(PRIMARY, T0 + 1)["k"] == 1
    assert events(t, T0 + 31) == [("uneject", 31.0, 1, None)]
    assert t.snapshot(PRIMARY, T0 + 31)["k"] == 2  # the multiplier the next ejection would use
    outcomes(t, PRIMARY, T0 + 31.5, ok=0, failed=3)
    assert events(t, T0 + 32) == [("eject", 32.0, 2, 60)]
    assert events(t, T0 + 92) == [("uneject", 92.0, 2, None)]
    outcomes(t, PRIMARY, T0 + 92.2, ok=1, failed=1)
    assert events(t, T0 + 93) == [("eject", 93.0, 3, 90)]
    snap = t.snapshot(PRIMARY, T0 + 100)
    assert (snap["state"], snap["k"], snap["ejections"], snap["ejected_remaining_s"]) == ("ejected", 3, 3, 83)
    assert not t.is_available(PRIMARY, T0 + 182.9)
    assert t.is_available(PRIMARY, T0 + 183)


def test_ejection_time_is_capped_and_k_stops_growing_at_the_cap():
    t = tracker(HealthCheck(interval=1, base_ejection_time=30, max_ejection_time=70))
    at = T0
    durations = []
    for _ in range(5):
        outcomes(t, PRIMARY, at + 0.5, ok=0, failed=1)
        t.advance(at + 1)
        eject = [e for e in t.take_events() if e.action == "eject"][0]
        durations.append((eject.k, eject.duration_s))
        at = eject.ts + eject.duration_s
        t.advance(at)
        t.take_events()
        at = float(int(at))
    assert durations == [(1, 30), (2, 60), (3, 70), (3, 70), (3, 70)]


def test_k_decays_by_one_per_period_of_continuous_health_never_below_one():
    t = tracker()
    for failing_at in (0.5, 31.5):  # two ejections: k would be 3 next
        outcomes(t, PRIMARY, T0 + failing_at, ok=0, failed=1)
        t.advance(T0 + failing_at + 0.5)
    assert events(t, T0 + 92) == [("eject", 1.0, 1, 30), ("uneject", 31.0, 1, None),
                                   ("eject", 32.0, 2, 60), ("uneject", 92.0, 2, None)]
    assert t.snapshot(PRIMARY, T0 + 92)["k"] == 3
    outcomes(t, PRIMARY, T0 + 100, ok=3, failed=1)  # 25 %: still healthy
    assert events(t, T0 + 121.9) == []
    assert events(t, T0 + 122) == [("k_decrease", 122.0, 2, None)]
    assert events(t, T0 + 152) == [("k_decrease", 152.0, 1, None)]
    assert events(t, T0 + 1000) == []
    assert t.snapshot(PRIMARY, T0 + 1000)["k"] == 1


def test_k_decay_period_is_configurable():
    t = tracker(HealthCheck(interval=1, base_ejection_time=30, k_decay_after=5))
    outcomes(t, PRIMARY, T0 + 0.5, ok=0, failed=1)
    assert events(t, T0 + 36) == [("eject", 1.0, 1, 30), ("uneject", 31.0, 1, None),
                                  ("k_decrease", 36.0, 1, None)]


def test_nodes_are_ejected_independently():
    other = NodeId("primary", "http://127.0.0.1:8011")
    t = tracker(nodes=(PRIMARY, other, FALLBACK))
    outcomes(t, PRIMARY, T0 + 0.5, ok=0, failed=2)
    outcomes(t, other, T0 + 0.5, ok=2, failed=0)
    outcomes(t, other, T0 + 1.5, ok=0, failed=2)
    t.advance(T0 + 2)
    got = [(e.action, e.node, e.ts - T0) for e in t.take_events()]
    assert got == [("eject", PRIMARY.url, 1.0), ("eject", other.url, 2.0)]
    assert t.monitors[PRIMARY].ejected_until == T0 + 31 and t.monitors[other].ejected_until == T0 + 32


def test_an_ejected_nodes_outcomes_do_not_extend_its_ejection():
    t = tracker()
    outcomes(t, PRIMARY, T0 + 0.5, ok=0, failed=1)
    outcomes(t, PRIMARY, T0 + 5.5, ok=0, failed=5)  # panic routing may still send it work
    assert events(t, T0 + 31) == [("eject", 1.0, 1, 30), ("uneject", 31.0, 1, None)]


def test_manual_eject_restore_and_reset():
    t = tracker()
    t.eject(PRIMARY, T0 + 3)
    t.eject(PRIMARY, T0 + 4)  # already ejected: nothing
    assert events(t, T0 + 5) == [("eject", 3.0, 1, 30)]
    t.restore(PRIMARY, T0 + 6)
    assert events(t, T0 + 6) == [("uneject", 6.0, 1, None)]
    nodes = pool()
    nodes.eject(PRIMARY, T0 + 3)
    nodes.restore(PRIMARY, T0 + 6)
    assert nodes.snapshot(PRIMARY, T0 + 6)["k"] == 2
    nodes.reset(T0 + 7)
    snap = nodes.snapshot(PRIMARY, T0 + 7)
    assert (snap["k"], snap["ejections"], snap["requests"]) == (1, 0, 0)


def test_long_quiet_gaps_are_skipped_exactly():
    t = tracker(HealthCheck(interval=0.1, base_ejection_time=30))
    outcomes(t, PRIMARY, T0 + 0.05, ok=0, failed=1)
    outcomes(t, PRIMARY, T0 + 86_400.05, ok=0, failed=1)  # a day later, one interval of 0.1 s
    t.advance(T0 + 86_400.1 + 1e-6)
    got = [(e.action, round(e.ts - T0, 3)) for e in t.take_events()]
    assert got == [("eject", 0.1), ("uneject", 30.1), ("k_decrease", 60.1), ("eject", 86_400.1)]


def test_status_fields_and_ttfb_percentiles():
    t = pool()
    for i in range(1, 101):
        t.try_acquire(PRIMARY, T0, streamed=True).release(Outcome.OK, T0 + i * 0.001, ttfb_s=i / 1000)
    t.try_acquire(PRIMARY, T0 + 0.5, streamed=True)
    snap = t.snapshot(PRIMARY, T0 + 0.5)
    assert snap["ttfb_p50_ms"] == pytest.approx(50.5) and snap["ttfb_p95_ms"] == pytest.approx(95.05, abs=0.1)
    assert snap["inflight"] == 1 and snap["requests"] == 100 and snap["state"] == "healthy"
    assert snap["ttfb_history_ms"][-1] == pytest.approx(50.5)
    assert len(snap["ttfb_history_ms"]) == 60
    assert t.snapshot(PRIMARY, T0 + 61)["ttfb_p50_ms"] is None  # older than a minute


def test_client_errors_are_not_failures():
    t = tracker()
    for _ in range(3):
        t.record(PRIMARY, Outcome.CLIENT_ERROR, T0 + 0.5)
    assert events(t, T0 + 2) == []


# -- properties

step = st.tuples(
    st.floats(min_value=0, max_value=20, allow_nan=False),  # time advance
    st.sampled_from(["primary-a", "primary-b", "fallback"]),
    st.sampled_from(list(Outcome)),
)
CONFIG = HealthCheck(failure_rate_threshold=50, interval=0.5, base_ejection_time=3, max_ejection_time=10)
PROFILE = Profile(path="prop.yaml", upstreams=(
    Upstream("primary", ("http://127.0.0.1:1", "http://127.0.0.1:2")),
    Upstream("fallback", ("http://127.0.0.1:3",)),
))
NODES = {"primary-a": NodeId("primary", "http://127.0.0.1:1"), "primary-b": NodeId("primary", "http://127.0.0.1:2"),
         "fallback": NodeId("fallback", "http://127.0.0.1:3")}


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=80))
def test_invariants_hold_for_any_sequence_of_outcomes(steps):
    picker = CandidatePicker(PROFILE)
    seen: list[HealthEvent] = []
    nodes = NodePool(Profile(path="prop.yaml", upstreams=PROFILE.upstreams, health_check=CONFIG), T0, seen.append)
    t = nodes.detector
    now = T0
    for advance, name, outcome in steps:
        now += advance
        t.record(NODES[name], outcome, now)
        for event in seen:
            if event.action == "eject":
                assert event.duration_s <= CONFIG.max_ejection_time
        seen.clear()
        for m in t.monitors.values():
            assert m.k >= 1 and m.next_k >= 1
            if m.is_ejected(now):
                assert m.ejected_until - now <= CONFIG.max_ejection_time
        chosen = [c.node for c in picker.candidates(nodes, now)]
        healthy = [n for n in t.nodes if not t.monitors[n].is_ejected(now)]
        if healthy:
            assert set(chosen) == set(healthy), "ejected nodes are never chosen while a healthy one exists"
        else:
            assert set(chosen) == set(t.nodes), "with every node ejected, all are tried (panic)"
