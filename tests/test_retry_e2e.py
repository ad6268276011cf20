"""Retry discipline end to end: Retry-After, the retry budget, failover_on, the deadline, probing."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.asking import chat, served

pytestmark = pytest.mark.e2e

INTERVAL = 0.2


def profile(primaries: list[str], fallback: str, *, top: str = "", primary: str = "", min_requests: int = 1000,
            base: float = 30.0) -> str:
    nodes = ", ".join(f'"{url}"' for url in primaries)
    return f"""
first_byte_timeout: 500ms
health_check:
  interval: {INTERVAL}s
  base_ejection_time: {base}s
  min_requests: {min_requests}
{top}
upstreams:
  - name: primary
    nodes: [{nodes}]
{primary}
  - name: fallback
    nodes: ["{fallback}"]
"""


def metrics(proxy) -> dict:
    text = httpx.get(f"{proxy.status_url}/metrics", timeout=5).text
    return {(s.name, s.labels.get("upstream")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_retry_after_keeps_new_attempts_off_the_node_until_then(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(profile([primary.url], fallback.url))
    primary.set_faults(status=429, retry_after=2)
    assert served(chat(proxy)) == ("fallback", "2")
    paced_at = time.time()
    node = proxy.status()["upstreams"][0]["nodes"][0]
    assert node["state"] == "healthy" and 1 < node["not_before_s"] <= 2, "paced, not ejected"
    primary.clear_faults()
    while time.time() < paced_at + 1.5:
        assert served(chat(proxy)) == ("fallback", "1"), "no attempt on the primary before its Retry-After"
    assert primary.stats()["requests"] == 1
    time.sleep(max(0.0, paced_at + 2.05 - time.time()))
    assert served(chat(proxy)) == ("primary", "1")
    node = proxy.status()["upstreams"][0]["nodes"][0]
    assert (node["failures"], node["ejections"]) == (1, 0), "the 429 counted once, no ejection"


def test_retry_after_with_no_other_candidate_waits_up_to_the_cap_else_429(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(profile([primary.url], fallback.url, top="retry_after_max: 2s"))
    primary.set_faults(status=429, retry_after=1)
    fallback.set_faults(status=429, retry_after=5)
    started = time.monotonic()
    response = chat(proxy)
    # Both paced; the primary is free again within the cap: waited for, tried again (still 429).
    assert 0.9 < time.monotonic() - started < 3
    assert response.status_code == 429 and response.headers["x-llm-ha-attempts"] == "3"
    primary.set_faults(status=0)
    primary.set_faults(status=429, retry_after=5)
    time.sleep(1.1)
    chat(proxy)  # paces the primary for 5 s
    started = time.monotonic()
    response = chat(proxy)
    assert time.monotonic() - started < 1, "past retry_after_max: no wait"
    assert response.status_code == 429 and response.headers["x-llm-ha-attempts"] == "0"
    assert 3 <= int(response.headers["retry-after"]) <= 5


def test_a_429_storm_does_not_multiply_attempts_beyond_the_budget(simulators, proxies):
    nodes = [simulators("--no-physics") for _ in range(3)]
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    top = "retry_budget: {percent: 20, min_per_s: 0, window: 60s}"
    proxy = proxies(profile([n.url for n in nodes], fallback.url, top=top))
    for node in nodes:
        node.set_faults(status=429)
    requests = 20
    for _ in range(requests):
        assert served(chat(proxy))[0] == "fallback"
    on_primary = sum(n.stats()["requests"] for n in nodes)
    print(f"\n429 storm: {requests} requests -> {on_primary} attempts on a 3-node primary "
          f"(without a budget: {3 * requests})")
    assert on_primary <= requests * 1.2 + 1
    budget = proxy.status()["upstreams"][0]["retry_budget"]
    assert budget["retries_denied"] >= requests - 5 and budget["retries"] == on_primary - requests
    samples = metrics(proxy)
    assert samples[("llm_ha_upstream_retries_denied_total", "primary")] == budget["retries_denied"]


def test_max_attempts_per_upstream_caps_one_request(simulators, proxies):
    nodes = [simulators("--no-physics") for _ in range(3)]
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(profile([n.url for n in nodes], fallback.url, primary="    max_attempts_per_upstream: 2"))
    for node in nodes:
        node.set_faults(status=500)
    assert served(chat(proxy)) == ("fallback", "3")


def test_context_length_exceeded_fails_over_and_is_not_a_failure(simulators, proxies, tmp_path):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(profile([primary.url], fallback.url, min_requests=1,
                            primary="    failover_on: [context_length_exceeded]"))
    primary.set_faults(status=400, status_code="context_length_exceeded")
    for stream in (True, False):
        assert served(chat(proxy, stream=stream)) == ("fallback", "2")
    time.sleep(INTERVAL * 2)
    node = proxy.status()["upstreams"][0]["nodes"][0]
    assert (node["state"], node["failures"], node["requests"]) == ("healthy", 0, 2)

    primary.set_faults(status=400, status_code="invalid_value")  # not listed: the client's, as before
    response = chat(proxy)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_value"
    assert response.headers["x-llm-ha-attempts"] == "1"

    fallback.set_faults(status=400, status_code="context_length_exceeded")
    primary.set_faults(status=400, status_code="context_length_exceeded")
    response = chat(proxy)  # the last upstream does not list it: its 400 goes back to the client
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert response.headers["x-llm-ha-attempts"] == "2"


def test_request_deadline_cuts_the_attempts_short_with_a_504(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    top = "request_deadline: 700ms"
    proxy = proxies(profile([primary.url], fallback.url, top=top,
                            primary="    first_byte_timeout: 500ms").replace(
        'nodes: ["' + fallback.url + '"]', 'nodes: ["' + fallback.url + '"]\n    first_byte_timeout: 2s'))
    primary.set_faults(first_token_delay=5)
    fallback.set_faults(first_token_delay=5)
    started = time.monotonic()
    response = chat(proxy)
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"]["code"] == "request_deadline_exceeded"
    assert 0.6 < elapsed < 1.2, f"the fallback's 2 s first_byte_timeout cut to the 200 ms left: {elapsed:.2f}s"
    assert response.headers["x-llm-ha-attempts"] == "2"
    fallback_node = proxy.status()["upstreams"][1]["nodes"][0]
    assert fallback_node["failures"] == 0, "cut by the deadline, not the node's fault"


def test_a_restarting_primary_is_probed_and_returns_without_a_second_ejection(simulators, proxies, tmp_path):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    events_path = tmp_path / "events.jsonl"
    top = "probe: {interval: 300ms, timeout: 500ms}"
    proxy = proxies(profile([primary.url], fallback.url, top=top, min_requests=1, base=2.0),
                    options={"llm_ha_events": str(events_path)})
    assert served(chat(proxy)) == ("primary", "1")

    failures: list[str] = []
    stop = threading.Event()

    def clients() -> None:
        while not stop.is_set():
            response = chat(proxy)
            if response.status_code != 200:
                failures.append(response.text)
            time.sleep(0.05)

    worker = threading.Thread(target=clients)
    worker.start()
    try:
        primary.set_faults(refuse=True)
        down_at = time.time()
        proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=3)
        time.sleep(max(0.0, down_at + 6 - time.time()))
        primary.set_faults(refuse=False)
        back_at = time.time()
        status = proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "healthy", timeout=3)
        returned_at = time.time()
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=15)
    node = proxy.status()["upstreams"][0]["nodes"][0]
    print(f"\nprimary refused 6 s; back -> in rotation after {returned_at - back_at:.2f}s; "
          f"{node['probes']} probes ({node['probe_failures']} failed)")
    assert not failures, failures[:2]
    assert status["upstreams"][0]["nodes"][0]["ejections"] == 1 and node["ejections"] == 1, "no second ejection"
    assert node["k"] == 2, "k grew once, for the one ejection"
    assert returned_at - back_at < 1.0
    assert node["probes"] >= 5 and node["probe_failures"] >= 4
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    actions = [e["action"] for e in events if e["action"] in ("eject", "hold", "uneject")]
    assert actions == ["eject", "hold", "uneject"]
    probes = [e for e in events if e["action"] == "probe"]
    assert probes and not probes[0]["passed"] and probes[-1]["passed"]
    assert served(chat(proxy)) == ("primary", "1")


def test_probes_carry_the_upstreams_own_key_never_the_clients(simulators, proxies, tmp_path):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    events_path = tmp_path / "events.jsonl"
    text = profile([primary.url], fallback.url, top="probe: {interval: 200ms}", min_requests=1, base=5.0,
                   primary='    api_key: "upstream-key"')
    proxy = proxies(text, options={"llm_ha_events": str(events_path)})
    primary.set_faults(status=500)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10,
                          headers={"authorization": "Bearer client-secret", "cookie": "session=client"})
    assert served(response) == ("fallback", "2")
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["probes"] >= 2, timeout=3)
    last = primary.stats()["last_request"]
    assert (last["method"], last["path"], last["authorization"]) == ("GET", "/v1/models", "Bearer upstream-key")
    probes = [json.loads(line) for line in events_path.read_text().splitlines()]
    probes = [e for e in probes if e["action"] == "probe"]
    assert len(probes) == 1 and probes[0]["status"] == 500 and not probes[0]["passed"], "an event when it changes"
    samples = metrics(proxy)
    assert samples[("llm_ha_node_probe_failures_total", "primary")] >= 2
