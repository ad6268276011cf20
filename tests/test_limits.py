"""The concurrency limiter with synthetic TTFB series and a fake clock."""

import pytest

from llmha.core.candidates import CandidatePicker
from llmha.core.limits import LimitSettings, NodeLimiter
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.types import Outcome

ADAPTIVE = LimitSettings(max_inflight=64, adaptive=True, min_inflight=2)


def feed(limiter: NodeLimiter, ttfbs, busy: bool = True) -> list[int]:
    """Observe each TTFB with the node using its whole limit (busy) or almost nothing."""
    seen = []
    for ttfb in ttfbs:
        inflight = limiter.limit(0) if busy else 0
        limiter.observe(Outcome.OK, ttfb, 0.2, inflight)
        seen.append(limiter.limit(0))
    return seen


def test_starts_at_the_minimum_and_grows_while_ttfb_stays_under_the_target():
    limiter = NodeLimiter(ADAPTIVE)
    assert limiter.limit(0) == 2
    limits = feed(limiter, [0.050, 0.051, 0.049, 0.052] * 30)
    assert limits == sorted(limits) and limits[-1] == 64, limits
    assert limits[30] >= 16, "reaches a 7B server's batch size within a few dozen answers"


def test_a_full_batch_at_two_and_a_half_times_the_minimum_is_not_shrunk():
    limiter = NodeLimiter(LimitSettings(max_inflight=16, adaptive=True, min_inflight=2))
    feed(limiter, [0.04] * 60)
    assert limiter.limit(0) == 16
    feed(limiter, [0.095] * 50)  # target = max(2 x 0.04, 0.2 / 2) = 0.1
    assert limiter.limit(0) == 16


def test_shrinks_when_ttfb_passes_the_target_and_never_below_the_minimum():
    limiter = NodeLimiter(ADAPTIVE)
    feed(limiter, [0.05] * 120)
    assert limiter.limit(0) == 64
    rising = feed(limiter, [0.05 * (1 + i / 5) for i in range(1, 60)])
    assert rising[-1] < 16 and all(b <= a for a, b in zip(rising, rising[1:])), rising
    feed(limiter, [1.0] * 200)
    assert limiter.limit(0) == 2


def test_settles_where_ttfb_meets_the_target_and_grows_back_below_it():
    limiter = NodeLimiter(LimitSettings(max_inflight=32, adaptive=True, min_inflight=1))
    feed(limiter, [0.05] * 80)
    assert limiter.limit(0) == 32
    feed(limiter, [0.16] * 40)  # above the 0.1 target
    shrunk = limiter.limit(0)
    assert shrunk < 16
    feed(limiter, [0.06] * 80)
    assert limiter.limit(0) == 32


def test_does_not_grow_when_the_node_is_not_using_its_limit():
    limiter = NodeLimiter(ADAPTIVE)
    feed(limiter, [0.05] * 50, busy=False)
    assert limiter.limit(0) == 2


def test_only_streamed_first_tokens_are_latency_samples():
    limiter = NodeLimiter(ADAPTIVE)
    limiter.observe(Outcome.OK, 0.002, 0.2, 2, streamed=False)  # a GET /v1/models, a whole JSON answer
    assert limiter.ttfb_min is None
    feed(limiter, [0.05] * 120)
    assert limiter.limit(0) == 64


def test_a_timeout_counts_as_a_sample_at_the_timeout_and_other_failures_shrink():
    limiter = NodeLimiter(ADAPTIVE)
    feed(limiter, [0.05] * 120)
    limiter.observe(Outcome.TIMEOUT, None, 0.2, 64)
    assert limiter.limit(0) == 64, "one timeout among fast answers: the smoothed TTFB stays under target"
    for _ in range(4):
        limiter.observe(Outcome.TIMEOUT, None, 0.2, 64)
    assert limiter.smoothed > 0.1 and limiter.limit(0) < 64
    before = limiter.limit(0)
    limiter.observe(Outcome.CONNECT_ERROR, None, 0.2, 1)
    assert limiter.limit(0) < before


def test_a_fixed_cap_does_not_move():
    limiter = NodeLimiter(LimitSettings(max_inflight=4))
    feed(limiter, [0.05, 5.0, 0.01])
    assert limiter.limit(0) == 4


def test_no_settings_means_no_limit():
    assert NodeLimiter(LimitSettings()).limit(0) is None


def test_slow_start_ramps_linearly_after_a_return():
    limiter = NodeLimiter(LimitSettings(max_inflight=20, min_inflight=2, slow_start=30))
    assert limiter.limit(100) == 20
    limiter.returned(100)
    assert [limiter.limit(100 + t) for t in (0, 7.5, 15, 22.5, 29.9, 30, 60)] == [2, 6, 11, 15, 19, 20, 20]


def test_a_node_at_its_cap_refuses_the_lease_and_only_that_is_a_shed():
    profile = Profile(path="l.yaml", upstreams=(
        Upstream("primary", ("http://127.0.0.1:1",), max_inflight=2),
        Upstream("fallback", ("http://127.0.0.1:2",), max_inflight=1),
    ))
    pool = NodePool(profile, 0)
    primary, fallback = pool.nodes
    held = [pool.try_acquire(primary, 1, streamed=True) for _ in range(2)]
    assert pool.try_acquire(primary, 1, streamed=True) is None
    assert (pool[primary].inflight, pool[primary].shed, pool[fallback].shed) == (2, 1, 0)
    held[0].release(Outcome.OK, 2)
    assert pool.try_acquire(primary, 2, streamed=True) is not None, "a released slot is free again at once"
    assert pool[primary].monitor.failures == 0, "shedding is not a failure of the node"


def test_candidate_order_does_not_judge_limits():
    profile = Profile(path="l.yaml", upstreams=(
        Upstream("primary", ("http://127.0.0.1:1",), max_inflight=1),
        Upstream("fallback", ("http://127.0.0.1:2",), max_inflight=1),
    ))
    pool = NodePool(profile, 0)
    primary, fallback = pool.nodes
    pool.try_acquire(fallback, 0, streamed=True)
    for _ in range(3):
        assert [c.node for c in CandidatePicker(profile).candidates(pool, 1)] == [primary, fallback]
    assert pool[fallback].shed == 0, "a busy fallback the request never tried has shed nothing"


def test_over_limit_leases_are_granted_when_asked():
    profile = Profile(path="l.yaml", upstreams=(Upstream("only", ("http://127.0.0.1:1",), max_inflight=1),))
    pool = NodePool(profile, 0)
    (only,) = pool.nodes
    pool.try_acquire(only, 0, streamed=True)
    assert pool.try_acquire(only, 0, streamed=True) is None
    assert pool.try_acquire(only, 0, streamed=True, over_limit=True) is not None
    assert pool[only].inflight == 2


@pytest.mark.parametrize("text,problem", [
    ("adaptive: true", "upstreams[0].adaptive: needs max_inflight"),
    ("slow_start: 30s", "upstreams[0].slow_start: needs max_inflight"),
    ("max_inflight: 2\n    min_inflight: 3", "upstreams[0].min_inflight: 3 is above max_inflight 2"),
    ("max_inflight: 0", "upstreams[0].max_inflight: needs a whole number >= 1"),
])
def test_limit_settings_are_validated(tmp_path, text, problem):
    from llmha.core.profile import ProfileError, load_profile
    path = tmp_path / "p.yaml"
    path.write_text(f"upstreams:\n  - name: p\n    nodes: ['http://127.0.0.1:1']\n    {text}\n")
    with pytest.raises(ProfileError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_profile(path, env={})
