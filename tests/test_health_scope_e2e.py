"""Health per (node, model) end to end (issue 17): a hosted API's per-model rate limit takes out that
model on the node, not the node; a self-hosted server is still one unit.

Real mitmdump with llm-ha; the upstreams are a raw asyncio fake (`support/fake_upstream.py`) that serves
two models and fails one of them, and the simulator as the upstream a request fails over to.
"""

from __future__ import annotations

import json

import httpx
import pytest

from support.fake_upstream import FakeUpstream, Request, answers_chat, respond

pytestmark = pytest.mark.e2e

FAILING, HEALTHY = "model-a", "model-b"


def fails_one_model(status: int, headers: tuple[tuple[str, str], ...] = ()):
    """An OpenAI-compatible server with two models: FAILING always answers `status`, HEALTHY answers."""
    answers = answers_chat("served-by-fake")

    async def behaviour(request: Request, writer) -> None:
        if request.json.get("model") == FAILING:
            body = {"error": {"message": f"{FAILING}: try later", "type": "rate_limit_error", "code": "rate_limited"}}
            respond(writer, status, json.dumps(body).encode(), [("content-type", "application/json"), *headers])
        else:
            await answers(request, writer)

    return behaviour


@pytest.fixture
def fake():
    started: list[FakeUpstream] = []

    def start(behaviour) -> FakeUpstream:
        started.append(FakeUpstream(behaviour))
        return started[-1]

    yield start
    for upstream in started:
        upstream.stop()


def profile(first: str, backup: str, scope: str) -> str:
    return f"""
first_byte_timeout: 2s
request_timeout: 30s
health_check: {{interval: 0.5s, base_ejection_time: 30s}}
upstreams:
  - name: first
    nodes: ["{first}"]
    health_scope: {scope}
  - name: backup
    nodes: ["{backup}"]
"""


def chat(proxy, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=15, trust_env=False)


def served(response: httpx.Response) -> tuple[int, str, str]:
    return response.status_code, response.headers["x-llm-ha-upstream"], response.headers["x-llm-ha-attempts"]


def test_a_model_rate_limited_on_a_hosted_node_is_out_there_while_another_model_is_still_served_by_it(
        fake, simulators, proxies):
    hosted = fake(fails_one_model(429, (("retry-after", "1"),)))
    backup = simulators("--preset", "fallback")
    proxy = proxies(profile(hosted.url, backup.url, scope="model"))

    assert served(chat(proxy, FAILING)) == (200, "backup", "2")  # a 429 on the hosted node, then the backup
    status = proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["models"].get(FAILING, {}).get("state")
                            == "ejected", timeout=5)
    node = status["upstreams"][0]["nodes"][0]
    assert node["state"] == "healthy" and node["ejections"] == 0

    asked = len(hosted.requests)
    assert served(chat(proxy, FAILING)) == (200, "backup", "1")  # model-a: not even tried on its node
    for _ in range(5):
        response = chat(proxy, HEALTHY)
        assert served(response) == (200, "first", "1"), response.text  # model-b: its node, at once
        assert response.json()["model"] == "served-by-fake"
    assert [r.json["model"] for r in hosted.requests[asked:]] == [HEALTHY] * 5

    node = proxy.status()["upstreams"][0]["nodes"][0]
    assert node["state"] == "healthy" and node["ejections"] == 0
    assert node["models"][FAILING]["state"] == "ejected" and node["models"][FAILING]["k"] == 1
    assert node["models"][HEALTHY] == {**node["models"][HEALTHY], "state": "healthy", "ejections": 0, "failures": 0}
    assert f"ejected first {hosted.url}#{FAILING} for 30s (k=1, failure rate 100%)" in proxy.output()
    metrics = httpx.get(f"{proxy.status_url}/metrics", timeout=5, trust_env=False).text
    labels = f'node="{hosted.url}",upstream="first"'
    assert f'llm_ha_node_ejected{{{labels}}} 0.0' in metrics
    assert f'llm_ha_node_ejected{{model="{FAILING}",{labels}}} 1.0' in metrics
    assert f'llm_ha_node_ejected{{model="{HEALTHY}",{labels}}} 0.0' in metrics


def test_a_self_hosted_node_failing_one_model_is_out_for_every_model(fake, simulators, proxies):
    primary = fake(fails_one_model(500))
    backup = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, backup.url, scope="node"))

    assert served(chat(proxy, FAILING)) == (200, "backup", "2")
    status = proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=5)
    assert "models" not in status["upstreams"][0]["nodes"][0]

    asked = len(primary.requests)
    assert served(chat(proxy, HEALTHY)) == (200, "backup", "1")  # one unit: out for model-b too
    assert len(primary.requests) == asked
