"""Shared state against a real redis-server: several pools in one process stand for several instances.

Each `SharedNodePool` has its own Redis connections, its own instance id and its own local state, as
separate processes would; only the event loop is common, which lets the tests check invariants across
them at every step. The end-to-end tests with real mitmdumps are in test_shared_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from llmbench.cluster import RedisServer, redis_binary
from llmha.core.health import HealthEvent
from llmha.core.profile import HealthCheck, ProbeSettings, Profile, ProfileError, Upstream, masked_url, parse_profile
from llmha.core.types import NodeId, Outcome
from llmha.shared import redis_state
from llmha.shared.pool import SharedNodePool
from llmsim.control import free_port

PRIMARY = NodeId("primary", "http://127.0.0.1:1")
FALLBACK = NodeId("fallback", "http://127.0.0.1:2")


@pytest.fixture(scope="module")
def redis_server():
    if not redis_binary():
        pytest.skip("no redis-server (Debian: apt-get install -y redis-server; .ci/run installs it)")
    with RedisServer.start() as server:
        yield server


NO_PROBES = ProbeSettings(enabled=False)  # no prober runs in these tests: ejections end by their timers


def profile(url: str, name: str, max_inflight: int | None = None, interval: float = 0.2,
            probe: ProbeSettings = NO_PROBES) -> Profile:
    return Profile(path=f"{name}.yaml", shared_state=url, probe=probe,
                   health_check=HealthCheck(interval=interval, base_ejection_time=1.0, max_ejection_time=10.0),
                   upstreams=(Upstream("primary", (PRIMARY.url,), max_inflight=max_inflight),
                              Upstream("fallback", (FALLBACK.url,))))


class Instance:
    """One pool and the health events it reported (what its event log would hold)."""

    def __init__(self, profile: Profile, number: int) -> None:
        self.events: list[HealthEvent] = []
        self.pool = SharedNodePool(profile, time.time(), listener=self.events.append, instance=f"test-{number}")

    def ejections(self) -> list[HealthEvent]:
        return [e for e in self.events if e.action == "eject"]


@contextlib.asynccontextmanager
async def instances(profile: Profile, count: int):
    started = [Instance(profile, i) for i in range(count)]
    for instance in started:
        await instance.pool.start()
    try:
        await until(lambda: all(i.pool.store.connected for i in started), "every instance connected")
        yield started
    finally:
        for instance in started:
            await instance.pool.stop()


async def until(condition, what: str, timeout: float = 5.0) -> float:
    """Wait until `condition()`; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not in {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def fail_once(pool: SharedNodePool, node: NodeId = PRIMARY) -> None:
    lease = await pool.acquire(node, time.time(), streamed=True)
    lease.release(Outcome.HTTP_ERROR, time.time())


# -- the profile key

def test_shared_state_is_read_with_variables_and_its_password_never_shown():
    upstreams = [{"name": "primary", "nodes": ["http://127.0.0.1:1"]}]
    env = {"REDIS_PASSWORD": "s3cret-pw"}
    parsed = parse_profile({"shared_state": "redis://:${REDIS_PASSWORD}@10.0.0.5:6380/2", "upstreams": upstreams},
                           "p.yaml", env, None)
    assert parsed.shared_state == "redis://:s3cret-pw@10.0.0.5:6380/2"
    assert "s3cret-pw" not in repr(parsed)
    assert masked_url(parsed.shared_state) == "redis://:***@10.0.0.5:6380/2"
    assert masked_url("rediss://user:pw@h:1/0?password=pw2") == "rediss://user:***@h:1/0?password=***"
    for bad in ("http://:s3cret-pw@h:1/0", "redis://:s3cret-pw@h/db", "redis://:s3cret-pw@h:99999/0"):
        with pytest.raises(ProfileError) as refused:
            parse_profile({"shared_state": bad, "upstreams": upstreams}, "p.yaml", env, None)
        assert str(refused.value).startswith("p.yaml: shared_state: ")
        assert "s3cret-pw" not in str(refused.value)
    assert parse_profile({"upstreams": upstreams}, "p.yaml", env, None).shared_state is None


# -- the budget

def test_concurrent_acquirers_on_three_instances_never_hold_more_than_the_budget(redis_server, monkeypatch):
    """A randomized stress test: 3 instances, 30 workers, random hold times; checked at every step.

    The 30 workers share one event loop, which can lag past the 25 ms a request waits for a lease (a
    late answer refuses it, three make the instance degrade and decide alone): here the wait is longer,
    so that what is checked is the script's atomicity, with every instance connected throughout."""
    monkeypatch.setattr(redis_state, "ACQUIRE_TIMEOUT_S", 1.0)
    limit = 3

    async def scenario() -> tuple[int, int]:
        async with instances(profile(redis_server.url, "stress", max_inflight=limit), 3) as started:
            pools = [i.pool for i in started]
            rng = random.Random(7)
            granted = refused = 0
            worst = 0

            def held() -> int:
                return sum(p[PRIMARY].inflight for p in pools)

            async def worker(pool: SharedNodePool) -> None:
                nonlocal granted, refused, worst
                for _ in range(25):
                    lease = await pool.acquire(PRIMARY, time.time(), streamed=True)
                    worst = max(worst, held())
                    if lease is None:
                        refused += 1
                        await asyncio.sleep(rng.uniform(0, 0.005))
                        continue
                    granted += 1
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    lease.release(rng.choice([Outcome.OK, Outcome.CANCELLED, Outcome.HTTP_ERROR]), time.time())

            await asyncio.gather(*(worker(pools[n % 3]) for n in range(30)))
            assert all(p.store.connected and p.store.timeouts == 0 for p in pools)
            assert worst <= limit, f"{worst} leases held at once across the instances, the budget is {limit}"
            assert await until_async(lambda: pools[0].store.client.zcard(pools[0].store.leases_key(PRIMARY)), 0)
            return granted, refused

    granted, refused = asyncio.run(scenario())
    assert granted >= limit and refused > 0  # the budget was reached, and held


def test_a_lease_past_the_limit_still_counts_in_the_cluster_and_is_released(redis_server):
    async def scenario() -> None:
        async with instances(profile(redis_server.url, "past", max_inflight=1), 2) as (a, b):
            first = await a.pool.acquire(PRIMARY, time.time(), streamed=True)
            assert await b.pool.acquire(PRIMARY, time.time(), streamed=True) is None
            forced = await b.pool.acquire(PRIMARY, time.time(), streamed=True, over_limit=True)
            leases = a.pool.store.leases_key(PRIMARY)
            await until(lambda: forced.registered, "registered")
            await asyncio.sleep(0.05)
            assert await a.pool.store.client.zcard(leases) == 2
            first.release(Outcome.OK, time.time())
            forced.release(Outcome.OK, time.time())
            assert await until_async(lambda: a.pool.store.client.zcard(leases), 0)
            assert (a.pool[PRIMARY].shed, b.pool[PRIMARY].shed) == (0, 1)

    asyncio.run(scenario())


async def until_async(fetch, wanted, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while await fetch() != wanted:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- health

def test_the_cluster_failure_rate_ejects_once_and_every_instance_applies_it(redis_server):
    """Each instance alone is under the threshold (1 failure in 3); together they fail 2 in 4: one ejection."""

    async def scenario() -> None:
        hc_profile = profile(redis_server.url, "rate")
        async with instances(hc_profile, 2) as (a, b):
            await wait_for_interval_start(0.2)
            for _ in range(2):
                await succeed_once(a.pool)
            await fail_once(a.pool)
            await fail_once(b.pool)
            await until(lambda: not a.pool.is_available(PRIMARY, time.time())
                        and not b.pool.is_available(PRIMARY, time.time()), "ejected on both", 2.0)
            assert len(a.ejections() + b.ejections()) == 1, "exactly one instance logs the ejection"
            assert {a.pool[PRIMARY].monitor.k, b.pool[PRIMARY].monitor.k} == {1}
            assert {a.pool[PRIMARY].monitor.ejections, b.pool[PRIMARY].monitor.ejections} == {1}
            event = (a.ejections() + b.ejections())[0]
            assert event.failure_rate == 50.0
            await until(lambda: b.pool.snapshot(PRIMARY, time.time())["cluster"]["failure_rate"] == 50.0,
                        "the cluster's failure rate shown on both", 1.0)
            assert a.pool.snapshot(PRIMARY, time.time())["cluster"]["failure_rate"] == 50.0

            # the return (after 1 s) is seen by both; one of them logs it; the next ejection has k = 2
            await until(lambda: b.pool.is_available(PRIMARY, time.time())
                        and a.pool.is_available(PRIMARY, time.time()), "back on both", 2.0)
            await asyncio.sleep(0.1)
            returns = [e for e in a.events + b.events if e.action == "uneject"]
            assert len(returns) == 1
            await fail_once(b.pool)
            await until(lambda: not a.pool.is_available(PRIMARY, time.time()), "ejected again", 2.0)
            assert [e.k for e in a.ejections() + b.ejections()] == [1, 2]
            assert a.pool[PRIMARY].monitor.ejection_state() == b.pool[PRIMARY].monitor.ejection_state()

    asyncio.run(scenario())


async def succeed_once(pool: SharedNodePool) -> None:
    lease = await pool.acquire(PRIMARY, time.time(), streamed=True)
    lease.release(Outcome.OK, time.time())


async def wait_for_interval_start(interval: float) -> None:
    """Just after an interval boundary, so a few quick attempts fall in one interval."""
    await asyncio.sleep(interval - time.time() % interval + 0.01)


def test_random_outcomes_on_three_instances_give_each_ejection_once_with_k_in_order(redis_server):
    """A randomized run: three instances record mostly failures for 3 s; the primary is ejected, returns,
    is ejected again. Every ejection is logged by exactly one instance, k goes 1, 2, 3..., and all agree."""
    hc = HealthCheck(interval=0.2, base_ejection_time=0.4, max_ejection_time=2.0)
    shared = Profile(path="random.yaml", shared_state=redis_server.url, health_check=hc, probe=NO_PROBES,
                     upstreams=(Upstream("primary", (PRIMARY.url,)), Upstream("fallback", (FALLBACK.url,))))

    async def scenario() -> None:
        async with instances(shared, 3) as started:
            rng = random.Random(11)
            end = time.monotonic() + 3.0

            async def traffic(pool: SharedNodePool) -> None:
                while time.monotonic() < end:
                    if pool.is_available(PRIMARY, time.time()):
                        lease = await pool.acquire(PRIMARY, time.time(), streamed=True)
                        outcome = Outcome.HTTP_ERROR if rng.random() < 0.7 else Outcome.OK
                        lease.release(outcome, time.time())
                    await asyncio.sleep(rng.uniform(0.005, 0.03))

            await asyncio.gather(*(traffic(i.pool) for i in started))
            await asyncio.sleep(0.3)  # the last judgement and its publication
            ejections = sorted((e.ts, e.k) for i in started for e in i.ejections())
            assert len(ejections) >= 3
            ks = [k for _, k in ejections]
            assert ks == sorted(ks) and ks[0] == 1, f"k in order, each once: {ks}"
            states = {i.pool[PRIMARY].monitor.ejection_state() for i in started}
            assert len(states) == 1, "every instance holds the same state"
            assert states.pop().ejections == len(ejections)

    asyncio.run(scenario())


def test_with_probes_a_held_node_returns_everywhere_when_one_instance_s_probe_passes(redis_server):
    async def scenario() -> None:
        probing = profile(redis_server.url, "probing", probe=ProbeSettings(enabled=True))
        async with instances(probing, 2) as (a, b):
            a.pool.eject(PRIMARY, time.time())  # 1 s
            await asyncio.sleep(1.2)
            assert not a.pool.is_available(PRIMARY, time.time()) and not b.pool.is_available(PRIMARY, time.time())
            assert a.pool[PRIMARY].monitor.held and b.pool[PRIMARY].monitor.held, "no probe has passed yet"
            b.pool.probe_result(PRIMARY, True, time.time())
            await until(lambda: a.pool.is_available(PRIMARY, time.time()), "back on the other instance too", 0.5)
            a.pool.probe_result(PRIMARY, True, time.time())  # late: nothing to end any more
            await asyncio.sleep(0.2)
            events = [e.action for e in a.events + b.events]
            assert sorted(events) == ["eject", "hold", "uneject"], "each logged once, by one instance"

    asyncio.run(scenario())


def test_manual_eject_restore_and_reset_reach_every_instance_and_are_logged_once(redis_server):
    async def scenario() -> None:
        async with instances(profile(redis_server.url, "manual"), 3) as (a, b, c):
            a.pool.eject(FALLBACK, time.time())
            took = await until(lambda: not b.pool.is_available(FALLBACK, time.time())
                               and not c.pool.is_available(FALLBACK, time.time()), "ejected everywhere", 0.5)
            assert took < 0.5
            b.pool.restore(FALLBACK, time.time())
            await until(lambda: a.pool.is_available(FALLBACK, time.time())
                        and c.pool.is_available(FALLBACK, time.time()), "restored everywhere", 0.5)
            assert b.pool[FALLBACK].monitor.k == a.pool[FALLBACK].monitor.k == c.pool[FALLBACK].monitor.k == 2
            c.pool.reset(time.time())
            await until(lambda: a.pool[FALLBACK].monitor.k == 1 and b.pool[FALLBACK].monitor.k == 1, "reset", 0.5)
            assert [e.action for e in a.events] == ["eject"]
            assert [e.action for e in b.events] == ["uneject"]
            assert {e.action for e in c.events} == {"reset"}

    asyncio.run(scenario())


# -- Redis away

def test_without_redis_an_instance_works_alone_at_once_and_says_so_once(caplog):
    async def scenario() -> None:
        url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"  # nothing listens there
        alone = Instance(profile(url, "alone", max_inflight=1), 0)
        await alone.pool.start()
        try:
            await asyncio.sleep(1.2)  # a few reconnection attempts
            started = time.monotonic()
            lease = await alone.pool.acquire(PRIMARY, time.time(), streamed=True)
            assert time.monotonic() - started < 0.005, "no wait on a Redis that is not there"
            assert lease is not None and await alone.pool.acquire(PRIMARY, time.time(), streamed=True) is None
            described = alone.pool.describe()
            assert described["state"] == "degraded" and described["url"].startswith("redis://:***@127.0.0.1:")
            lease.release(Outcome.HTTP_ERROR, time.time())
            await until(lambda: not alone.pool.is_available(PRIMARY, time.time()), "judged alone", 1.0)
        finally:
            await alone.pool.stop()

    with caplog.at_level("INFO", logger="llm_ha"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(said) == 1, said
    assert "topsecret" not in caplog.text


def test_after_redis_restarts_empty_an_instance_re_publishes_its_leases_and_ejections():
    if not redis_binary():
        pytest.skip("no redis-server (Debian: apt-get install -y redis-server; .ci/run installs it)")

    async def scenario(server: RedisServer) -> None:
        async with instances(profile(server.url, "restart", max_inflight=2), 1) as (alone,):
            pool = alone.pool
            lease = await pool.acquire(PRIMARY, time.time(), streamed=True)
            pool.eject(FALLBACK, time.time())
            await asyncio.sleep(0.1)
            server.stop()
            await until(lambda: not pool.store.connected, "degraded")
            server.start_again()  # empty: nothing was kept
            await until(lambda: pool.store.connected, "connected again", 5.0)
            client = pool.store.client
            assert await client.zrange(pool.store.leases_key(PRIMARY), 0, -1) == [lease.member]
            shared = await pool.store.read_states([FALLBACK])
            assert shared[FALLBACK][2].ejected_until == pool[FALLBACK].monitor.ejected_until
            lease.release(Outcome.OK, time.time())
            assert await until_async(lambda: client.zcard(pool.store.leases_key(PRIMARY)), 0)

    with RedisServer.start() as server:
        asyncio.run(scenario(server))


# -- health per (node, model) (`health_scope: model`)

def test_a_model_s_ejection_on_a_hosted_node_is_shared_under_its_own_key_and_leaves_the_node_in(redis_server):
    """One instance's 429s on model-a eject model-a's entry on the hosted node; the other takes it on, making
    the entry it did not have yet; the node and model-b stay in rotation on both."""
    hosted = Upstream("fallback", (FALLBACK.url,), health_scope="model")
    shared = Profile(path="models.yaml", shared_state=redis_server.url, probe=NO_PROBES,
                     health_check=HealthCheck(interval=0.2, base_ejection_time=1.0, max_ejection_time=10.0),
                     upstreams=(Upstream("primary", (PRIMARY.url,)), hosted))
    model_a, model_b = FALLBACK.for_model("model-a"), FALLBACK.for_model("model-b")

    async def attempt(pool: SharedNodePool, model: str, outcome: Outcome) -> None:
        entry = pool.health_entry(FALLBACK, model, time.time())
        lease = await pool.acquire(FALLBACK, time.time(), streamed=True, health=entry)
        lease.release(outcome, time.time())

    async def scenario() -> None:
        async with instances(shared, 2) as (a, b):
            await wait_for_interval_start(0.2)
            await attempt(a.pool, "model-a", Outcome.RATE_LIMITED)
            await attempt(b.pool, "model-b", Outcome.OK)
            await until(lambda: model_a in b.pool.detector.monitors
                        and b.pool.detector.monitors[model_a].is_ejected(time.time())
                        and not a.pool.is_available(model_a, time.time()), "model-a out on both", 2.0)
            for instance in (a, b):
                assert instance.pool.is_available(FALLBACK, time.time())
                assert instance.pool.health_entry(FALLBACK, "model-b", time.time()) == model_b
                assert instance.pool.is_available(model_b, time.time())
            [ejection] = a.ejections() + b.ejections()
            assert (ejection.node, ejection.model, ejection.failure_rate) == (FALLBACK.url, "model-a", 100.0)
            keys = await a.pool.store.client.keys(a.pool.store.state_key(FALLBACK) + "*")
            assert sorted(keys) == [a.pool.store.state_key(FALLBACK), a.pool.store.state_key(model_a)]
            assert a.pool.store.state_key(model_a).endswith("fallback http://127.0.0.1:2#model-a")

    asyncio.run(scenario())
