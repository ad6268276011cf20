"""Several mitmdumps with llm-ha and one profile, sharing health and budgets through a real redis-server.

Every process is real and on 127.0.0.1: redis-server (started here on a free port, nothing kept on
disk), the simulators, the mitmdumps, and nginx for the load-balanced test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import openai
import pytest

from llmbench.cluster import LoadBalancer, RedisServer, nginx_binary, redis_binary, wait_connected
from llmbench.proxy import start_mitmdump
from llmha.shared.redis_state import LEASE_TTL_S

pytestmark = pytest.mark.e2e

PASSWORD = "pw-never-shown-4711"


@pytest.fixture
def redis_server():
    if not redis_binary():
        pytest.skip("no redis-server (Debian: apt-get install -y redis-server; .ci/run installs it)")
    with RedisServer.start(password=PASSWORD) as server:
        yield server


@pytest.fixture
def cluster(confdir, tmp_path):
    """`cluster(n, profile_text, reverse)`: n mitmdumps with the same profile file (so the same shared
    state), each with its own event log (`proxy.events_path`); stopped after the test."""
    started = []

    def start(count: int, profile_text: str, reverse: str) -> list:
        profile = tmp_path / "cluster.yaml"
        profile.write_text(profile_text)
        proxies = []
        for _ in range(count):
            events = tmp_path / f"events-{len(started)}.jsonl"
            proxy = start_mitmdump(profile, reverse, confdir=confdir, options={"llm_ha_events": str(events)})
            proxy.events_path = events
            started.append(proxy)
            proxies.append(proxy)
        wait_connected(proxies)
        return proxies

    yield start
    for proxy in started:
        proxy.stop()


def profile(redis_url: str, primary: str, fallback: str, primary_extra: str = "", interval: float = 0.2) -> str:
    return f"""
first_byte_timeout: 2s
shared_state: "{redis_url}"
health_check: {{interval: {interval}s, base_ejection_time: 1s, max_ejection_time: 10s}}
upstreams:
  - name: primary
    nodes: ["{primary}"]
    {primary_extra}
  - name: fallback
    nodes: ["{fallback}"]
"""


def chat(url: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def primary_node(status: dict) -> dict:
    return status["upstreams"][0]["nodes"][0]


def ejected(proxy) -> bool:
    return primary_node(proxy.status())["state"] == "ejected"


def events(proxy, action: str) -> list[dict]:
    if not proxy.events_path.exists():
        return []
    lines = [json.loads(line) for line in proxy.events_path.read_text().splitlines()]
    return [e for e in lines if e["action"] == action and e["upstream"] == "primary"]


def test_an_ejection_on_the_clusters_failure_rate_is_in_force_everywhere_at_once_and_logged_once(
        redis_server, simulators, cluster):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback", "--no-physics")
    a, b = cluster(2, profile(redis_server.url, primary.url, fallback.url), primary.url)
    primary.set_faults(status=500)

    for k in (1, 2):  # the first ejection, then, once it is over, the second: k grows once each time
        deadline = time.monotonic() + 10
        while not (ejected(a) or ejected(b)):
            assert time.monotonic() < deadline, "no ejection"
            for proxy in (a, b):
                assert chat(proxy.url).status_code == 200  # the fallback answers
        first_seen = time.monotonic()
        other = b if ejected(a) else a
        while not ejected(other):
            assert time.monotonic() - first_seen < 0.5, "the other instance did not apply the ejection within 0.5 s"
            time.sleep(0.01)
        statuses = [a.status(), b.status()]
        assert [primary_node(s)["k"] for s in statuses] == [k, k]
        assert [primary_node(s)["ejections"] for s in statuses] == [k, k]
        assert sorted(e["k"] for e in events(a, "eject") + events(b, "eject")) == list(range(1, k + 1)), \
            "exactly one eject event per ejection, across the instances' logs"
        if k == 1:  # after 1 s (base_ejection_time) it is held until a probe passes: let it
            primary.clear_faults()
            deadline = time.monotonic() + 10
            while ejected(a) or ejected(b):
                assert time.monotonic() < deadline, "no return"
                time.sleep(0.05)
            primary.set_faults(status=500)

    statuses = [a.status(), b.status()]
    assert statuses[0]["instance"] != statuses[1]["instance"]
    for status in statuses:
        assert status["shared_state"]["state"] == "connected"
        assert status["shared_state"]["url"] == f"redis://:***@127.0.0.1:{redis_server.port}/0"
        assert status["shared_state"]["instances"] and len(status["shared_state"]["instances"]) == 2
    returns = events(a, "uneject") + events(b, "uneject")
    assert len(returns) == 1, "the return (one instance's probe passed) is seen by both, logged by one"
    assert len(events(a, "hold") + events(b, "hold")) <= 1
    for proxy in (a, b):
        shown = json.dumps(proxy.status()) + proxy.output() + proxy.events_path.read_text()
        assert PASSWORD not in shown


async def streams(urls: list[str], max_tokens: int) -> list[str]:
    """One streamed request to each URL at once; the upstream that served each."""

    async def one(url: str) -> str:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        try:
            async with client.chat.completions.with_streaming_response.create(
                    model="m", messages=[{"role": "user", "content": "slow"}], stream=True,
                    max_tokens=max_tokens) as response:
                async for _ in response.iter_lines():
                    pass
                return response.headers["x-llm-ha-upstream"]
        finally:
            await client.close()

    return await asyncio.gather(*(one(url) for url in urls))


def test_max_inflight_bounds_the_primary_across_three_instances(redis_server, simulators, cluster):
    primary = simulators()  # physics: 40 tokens take about a second
    fallback = simulators("--preset", "fallback")
    proxies = cluster(3, profile(redis_server.url, primary.url, fallback.url, "max_inflight: 2"), primary.url)
    served = asyncio.run(streams([p.url for p in proxies for _ in range(2)], max_tokens=40))
    assert sorted(served) == ["fallback"] * 4 + ["primary"] * 2
    assert primary.stats()["peak_batch"] <= 2
    statuses = [p.status() for p in proxies]
    assert sum(primary_node(s)["shed"] for s in statuses) == 4
    assert all(primary_node(s)["limit"] == 2 for s in statuses)


def test_a_killed_instance_frees_its_leases_within_their_expiry_and_the_others_keep_serving(
        redis_server, simulators, cluster):
    primary = simulators()
    fallback = simulators("--preset", "fallback")
    doomed, survivor = cluster(2, profile(redis_server.url, primary.url, fallback.url, "max_inflight: 2"),
                               primary.url)
    long_streams = threading.Thread(target=lambda: asyncio.run(_quietly(streams([doomed.url] * 2, 2000))),
                                    daemon=True)
    long_streams.start()
    survivor.wait_for(lambda s: primary_node(s)["cluster"]["inflight"] == 2, timeout=5)

    doomed.process.kill()  # SIGKILL: no goodbye, its two leases stay in Redis until they expire
    killed = time.monotonic()
    served = []
    while time.monotonic() - killed < LEASE_TTL_S + 3:
        response = chat(survivor.url)
        assert response.status_code == 200, response.text
        served.append(response.headers["x-llm-ha-upstream"])
        if served[-1] == "primary":
            break
        time.sleep(0.1)
    freed_after = time.monotonic() - killed
    assert served[0] == "fallback", "the dead instance's leases held the budget at first"
    assert served[-1] == "primary", f"the budget was not freed within {LEASE_TTL_S + 3:g} s"
    assert freed_after <= LEASE_TTL_S + 1.5


async def _quietly(coro) -> None:
    with contextlib.suppress(Exception):  # its proxy was killed under it
        await coro


def test_redis_stopping_and_coming_back_costs_no_request(redis_server, simulators, cluster):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback", "--no-physics")
    proxies = cluster(2, profile(redis_server.url, primary.url, fallback.url, "max_inflight: 4"), primary.url)
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for proxy in proxies:
                try:
                    outcomes.append(chat(proxy.url).status_code)
                except httpx.HTTPError as e:
                    outcomes.append(repr(e))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        time.sleep(0.5)
        redis_server.stop()
        for proxy in proxies:
            proxy.wait_for(lambda s: s["shared_state"]["state"] == "degraded", timeout=3)
        during = len(outcomes)
        time.sleep(1.0)
        assert len(outcomes) > during, "requests kept being served without Redis"
        redis_server.start_again()
        for proxy in proxies:
            proxy.wait_for(lambda s: s["shared_state"]["state"] == "connected", timeout=5)
        time.sleep(0.5)
    finally:
        stop.set()
        loader.join(30)
    assert outcomes and set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]
    for proxy in proxies:
        log = proxy.output()
        assert log.count(" unusable (") == 1 and log.count(" is back: ") == 1, "said once each"
        assert PASSWORD not in log


def test_instances_behind_nginx_round_robin_act_as_one(redis_server, simulators, cluster, tmp_path):
    if not nginx_binary():
        pytest.skip("no nginx (Debian: apt-get install -y nginx; .ci/run installs it)")
    primary = simulators()
    fallback = simulators("--preset", "fallback")
    proxies = cluster(3, profile(redis_server.url, primary.url, fallback.url, "max_inflight: 3"), primary.url)
    with LoadBalancer.start([p.port for p in proxies], tmp_path) as balancer:
        served = asyncio.run(streams([balancer.url] * 12, max_tokens=40))
    assert len(served) == 12 and set(served) <= {"primary", "fallback"}
    assert primary.stats()["peak_batch"] <= 3
    attempts = [sum(n["requests"] + n["shed"] for u in p.status()["upstreams"] for n in u["nodes"]) for p in proxies]
    assert all(attempts), f"round-robin reached every instance: {attempts}"
