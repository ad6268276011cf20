"""Hedging end to end: a primary slow to its first token, `hedge_after` shorter than that, a fast fallback."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_a_slow_first_token_is_hedged_on_the_fallback_and_the_primary_attempt_closed(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(f"""
first_byte_timeout: 2s
health_check:
  interval: 200ms
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
    hedge_after: 100ms
  - name: fallback
    nodes: ["{fallback.url}"]
""")
    primary.set_faults(first_token_delay=0.4)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    started = time.monotonic()
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        ttft = time.monotonic() - started
        rest = list(lines)
    assert response.status_code == 200 and '"content"' in first and "data: [DONE]" in rest
    assert response.headers["x-llm-ha-upstream"] == "fallback" and response.headers["x-llm-ha-attempts"] == "2"
    assert ttft < 0.3, f"the fallback's first token after {ttft * 1000:.0f} ms, not the primary's 400 ms"
    primary.wait_for(lambda s: s["client_disconnects"] == 1 and s["in_flight"] == 0, timeout=5)
    assert primary.stats()["completed"] == 0, "the primary's attempt was closed, not left to run"
    time.sleep(0.5)  # two health intervals: a loser counted as a failure would show by now
    nodes = {u["name"]: u["nodes"][0] for u in proxy.status()["upstreams"]}
    for name, node in nodes.items():
        assert (node["failures"], node["state"], node["inflight"]) == (0, "healthy", 0), (name, node)
