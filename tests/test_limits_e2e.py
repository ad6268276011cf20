"""Concurrency caps end to end: excess work goes to the fallback at once, not into the primary's queue."""

import asyncio

import openai
import pytest

pytestmark = pytest.mark.e2e


async def four_concurrent_streams(proxy) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0, timeout=20)

    async def one() -> str:
        async with client.chat.completions.with_streaming_response.create(
                model="m", messages=[{"role": "user", "content": "slow"}], stream=True, max_tokens=40) as response:
            async for _ in response.iter_lines():
                pass
            return response.headers["x-llm-ha-upstream"]

    try:
        return await asyncio.gather(*(one() for _ in range(4)))
    finally:
        await client.close()


def test_max_inflight_2_with_four_slow_requests_two_primary_two_fallback(simulators, proxies):
    primary = simulators()  # physics: 40 tokens take about a second
    fallback = simulators("--preset", "fallback")
    proxy = proxies(f"""
first_byte_timeout: 2s
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
    max_inflight: 2
  - name: fallback
    nodes: ["{fallback.url}"]
""")
    served = asyncio.run(four_concurrent_streams(proxy))
    assert sorted(served) == ["fallback", "fallback", "primary", "primary"]
    node = proxy.node("primary")
    assert (node["limit"], node["shed"], node["failures"], node["state"]) == (2, 2, 0, "healthy")
    assert primary.stats()["peak_batch"] <= 2


def test_a_busy_fallback_the_requests_never_tried_sheds_nothing(simulators, proxies):
    """Only a lease refused at the moment of an attempt is a shed (it used to count at every request)."""
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(f"""
first_byte_timeout: 2s
health_check: {{min_requests: 20}}
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
  - name: fallback
    nodes: ["{fallback.url}"]
    max_inflight: 1
""")
    primary.set_faults(refuse=True)

    async def scenario() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0, timeout=20)

        async def one(max_tokens: int) -> str:
            async with client.chat.completions.with_streaming_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                    max_tokens=max_tokens) as response:
                async for _ in response.iter_lines():
                    pass
                return response.headers["x-llm-ha-upstream"]

        try:
            slow = asyncio.create_task(one(300))  # about 3 s on the fallback
            for _ in range(100):
                if proxy.node("fallback")["inflight"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert proxy.node("fallback")["inflight"] == 1, "the slow stream holds the fallback's one slot"
            primary.clear_faults()
            served = [await one(5) for _ in range(3)]
            assert proxy.node("fallback")["inflight"] == 1, "still busy while the primary answered"
            return [*served, await slow]
        finally:
            await client.close()

    served = asyncio.run(scenario())
    assert served == ["primary", "primary", "primary", "fallback"]
    assert proxy.node("fallback")["shed"] == 0
