"""Leases (one per attempt) against random histories: the in-flight count can never drift."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.types import Outcome

PROFILE = Profile(path="leases.yaml", upstreams=(
    Upstream("primary", ("http://127.0.0.1:1", "http://127.0.0.1:2"), max_inflight=3),
    Upstream("fallback", ("http://127.0.0.1:3",)),
))
T0 = 1_000.0

# What can happen to an attempt: acquire, then its first byte, a release with some outcome (a timeout, a
# cancellation, a stream cut...), or a second release by a careless holder.
ACTIONS = st.sampled_from(["acquire", "acquire_over_limit", "first_byte", "release", "release_again"])
STEP = st.tuples(ACTIONS, st.integers(0, 2), st.integers(0, 40), st.sampled_from(list(Outcome)))


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=120))
def test_inflight_never_negative_never_over_the_limit_and_back_to_zero(steps):
    pool = NodePool(PROFILE, T0)
    nodes = list(pool.nodes)
    held, released, forced = [], [], 0
    now = T0
    for action, which, pick, outcome in steps:
        now += 0.05
        node = nodes[which]
        if action in ("acquire", "acquire_over_limit"):
            over = action == "acquire_over_limit"
            lease = pool.try_acquire(node, now, streamed=True, over_limit=over)
            limit = pool[node].limiter.limit(now)
            if lease is None:
                assert limit is not None and pool[node].inflight >= limit
            else:
                held.append(lease)
                forced += over
        elif action == "first_byte" and held:
            held[pick % len(held)].first_byte(0.05, now)
        elif action == "release" and held:
            lease = held.pop(pick % len(held))
            lease.release(outcome, now)
            released.append(lease)
        elif action == "release_again" and released:
            released[pick % len(released)].release(outcome, now)  # a no-op: only the first release counts
        for n in pool:
            assert n.inflight >= 0
            assert n.inflight == sum(1 for lease in held if lease.node == n.id)
            if forced == 0 and n.limiter.limit(now) is not None:
                assert n.inflight <= n.limiter.limit(now), "refused leases keep a node within its limit"
    for lease in held:
        lease.release(Outcome.CANCELLED, now)
    assert [n.inflight for n in pool] == [0, 0, 0]


def test_a_lease_counts_its_outcome_once_and_a_break_after_the_first_byte_as_a_failure():
    pool = NodePool(PROFILE, T0)
    node = next(iter(pool.nodes))
    lease = pool.try_acquire(node, T0, streamed=True)
    lease.first_byte(0.08, T0 + 0.08)
    assert (pool[node].monitor.requests, pool[node].monitor.failures, pool[node].inflight) == (1, 0, 1)
    lease.release(Outcome.STREAM_CUT, T0 + 2)
    lease.release(Outcome.STREAM_CUT, T0 + 3)
    assert (pool[node].monitor.requests, pool[node].monitor.failures, pool[node].inflight) == (2, 1, 0)


def test_a_cancelled_attempt_is_not_the_nodes_failure():
    pool = NodePool(PROFILE, T0)
    node = next(iter(pool.nodes))
    pool.try_acquire(node, T0, streamed=True).release(Outcome.CANCELLED, T0 + 1)
    assert (pool[node].monitor.requests, pool[node].monitor.failures, pool[node].inflight) == (0, 0, 0)


def test_a_failed_attempt_counts_once_and_feeds_the_latency_only_with_a_first_byte():
    pool = NodePool(PROFILE, T0)
    node = next(iter(pool.nodes))
    pool.try_acquire(node, T0, streamed=True).release(Outcome.TIMEOUT, T0 + 0.2)
    pool.try_acquire(node, T0, streamed=False).release(Outcome.OK, T0 + 0.5, ttfb_s=0.5)
    assert (pool[node].monitor.requests, pool[node].monitor.failures) == (2, 1)
    assert [t for _, t in pool[node].latency.ttfb_samples] == [0.5]
