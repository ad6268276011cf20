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
