"""Passive health checking end to end: a primary starts failing, is ejected with k, and returns."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.asking import chat, served

pytestmark = pytest.mark.e2e

INTERVAL, BASE = 0.2, 1.0


def profile(primary: str, fallback: str, min_requests: int = 1) -> str:
    return f"""
first_byte_timeout: 300ms
health_check:
  failure_rate_threshold: 50
  interval: {INTERVAL}s
  base_ejection_time: {BASE}s
  max_ejection_time: 10s
  min_requests: {min_requests}
upstreams:
  - name: primary
    nodes: ["{primary}"]
  - name: fallback
    nodes: ["{fallback}"]
"""


def primary_node(status: dict) -> dict:
    return status["upstreams"][0]["nodes"][0]


def read_events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_failing_primary_is_ejected_served_by_the_fallback_and_returns(simulators, proxies, tmp_path):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    events_path = tmp_path / "events.jsonl"
    proxy = proxies(profile(primary.url, fallback.url), options={"llm_ha_events": str(events_path)})
    assert served(chat(proxy)) == ("primary", "1")

    primary.set_faults(status=500)
    first_failure = time.time()
    assert served(chat(proxy)) == ("fallback", "2")  # transparent: the client never sees the 500
    status = proxy.wait_for(lambda s: primary_node(s)["state"] == "ejected", timeout=3)
    node = primary_node(status)
    assert (node["k"], node["ejections"]) == (1, 1)
    assert 0 < node["ejected_remaining_s"] <= BASE
    assert node["failure_rate"] >= 50.0  # the ok request may share the interval

    requests_before = primary.stats()["requests"]
    for _ in range(3):
        assert served(chat(proxy)) == ("fallback", "1"), "an ejected primary is not tried"
    assert primary.stats()["requests"] == requests_before

    primary.clear_faults()
    status = proxy.wait_for(lambda s: primary_node(s)["state"] == "healthy", timeout=BASE + 2)
    assert primary_node(status)["k"] == 2, "the next ejection would last 2 x base"
    assert served(chat(proxy)) == ("primary", "1")

    primary.set_faults(status=500)
    served(chat(proxy))
    node = primary_node(proxy.wait_for(lambda s: primary_node(s)["state"] == "ejected", timeout=3))
    assert node["k"] == 2 and node["ejections"] == 2 and node["ejected_remaining_s"] > BASE

    events = read_events(events_path)
    ejects = [e for e in events if e["action"] == "eject"]
    assert [(e["k"], e["duration_s"]) for e in ejects] == [(1, BASE), (2, 2 * BASE)]
    for e in events:
        assert {"ts", "action", "upstream", "node", "k", "duration_s", "failure_rate"} <= set(e)
    assert [e["action"] for e in events if e["action"] in ("eject", "uneject")] == ["eject", "uneject", "eject"]
    failovers = [e for e in events if e["action"] == "failover"]
    assert len(failovers) == 2 and failovers[0]["reason"] == "http_error" and failovers[0]["to_upstream"] == "fallback"

    delay = ejects[0]["ts"] - first_failure
    print(f"\nfirst failing request -> ejection: {delay:.3f}s = {delay / INTERVAL:.2f} intervals of {INTERVAL}s")
    assert delay <= INTERVAL + 0.1, "ejected at the end of the interval the failure happened in"

    output = proxy.stop()
    assert f"ejected primary {primary.url} for 1s (k=1, failure rate " in output
    assert f"ejected primary {primary.url} for 2s (k=2, failure rate " in output
    assert f"primary {primary.url} returns to rotation after its k=1 ejection" in output


def test_min_requests_protects_a_node_with_too_few_attempts(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, min_requests=50))
    primary.set_faults(status=500)
    for _ in range(3):
        assert served(chat(proxy)) == ("fallback", "2")
    time.sleep(INTERVAL * 2)
    assert primary_node(proxy.status())["state"] == "healthy"


def test_every_node_ejected_still_serves_by_trying_all_soonest_return_first(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics", "--model", "qwen-plus")
    proxy = proxies(profile(primary.url, fallback.url))
    primary.set_faults(status=500)
    fallback.set_faults(status=500)
    response = chat(proxy)
    assert response.status_code == 502 and response.headers["x-llm-ha-attempts"] == "2"
    proxy.wait_for(lambda s: all(u["nodes"][0]["state"] == "ejected" for u in s["upstreams"]), timeout=3)

    fallback.clear_faults()
    response = chat(proxy)
    assert served(response) == ("fallback", "2"), "panic: both tried, the primary (ejected first) leads"


def test_fallback_upstreams_are_health_checked_too(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--no-physics")
    proxy = proxies(profile(primary.url, fallback.url))
    fallback.set_faults(status=429)
    primary.set_faults(status=500)
    chat(proxy)
    status = proxy.wait_for(lambda s: s["upstreams"][1]["nodes"][0]["state"] == "ejected", timeout=3)
    assert status["upstreams"][1]["nodes"][0]["k"] == 1


def test_metrics_are_prometheus_text_prefixed_llm_ha(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    primary.set_faults(status=500)
    chat(proxy)
    proxy.wait_for(lambda s: primary_node(s)["state"] == "ejected", timeout=3)
    text = httpx.get(f"{proxy.status_url}/metrics", timeout=5).text
    samples = {(s.name, s.labels.get("upstream")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert all(name.startswith("llm_ha_") for name, _ in samples)
    assert samples[("llm_ha_node_ejected", "primary")] == 1
    assert samples[("llm_ha_node_ejected", "fallback")] == 0
    assert samples[("llm_ha_node_k", "primary")] == 1
    assert samples[("llm_ha_node_ejections_total", "primary")] == 1
    assert samples[("llm_ha_node_failures_total", "primary")] == 1
    assert samples[("llm_ha_failovers_total", None)] == 1
    assert 0 <= samples[("llm_ha_event_loop_lag_seconds", None)] < 1
    assert httpx.get(f"{proxy.status_url}/nope", timeout=5).status_code == 404


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp (IPv4)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_status_is_bound_to_the_given_address_only(simulators, proxies):
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(fallback.url, fallback.url))
    status_port = int(proxy.status_url.rsplit(":", 1)[1])
    assert listening_addresses(status_port) == {"127.0.0.1"}
