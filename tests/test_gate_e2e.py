"""The failover gate end to end: a real mitmdump with llm-ha, simulators on 127.0.0.1, the openai client."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from mitmproxy import io

pytestmark = pytest.mark.e2e

CLIENT_KEY = "sk-client-own-key-0001"
PRIMARY_KEY = "sk-primary-secret-0002"
FALLBACK_KEY = "sk-fallback-secret-0003"


def profile(primary: str | None, fallback: str, *, first_byte="200ms", extra="", health="") -> str:
    nodes = f'\n    nodes: ["{primary}"]' if primary else ""
    return f"""
first_byte_timeout: {first_byte}
request_timeout: 10s
health_check:
  failure_rate_threshold: 50
  interval: 1s
  base_ejection_time: 30s
  min_requests: 1{health}
upstreams:
  - name: primary{nodes}
    model: primary-model-name
  - name: fallback
    nodes: ["{fallback}"]
    api_key: "{FALLBACK_KEY}"
    model: qwen-plus
    first_byte_timeout: 5s
{extra}"""


def client(proxy, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0, timeout=15)


def stream_chat(proxy, key: str = CLIENT_KEY, max_tokens: int = 16):
    """(headers, chunk arrival times, text, model) of one streamed chat completion."""
    raw = client(proxy, key).chat.completions.with_raw_response.create(
        model="whatever-the-client-says", messages=[{"role": "user", "content": "hi"}],
        stream=True, max_tokens=max_tokens)
    times, text, model = [], "", None
    for chunk in raw.parse():
        times.append(time.monotonic())
        model = chunk.model or model
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return raw.headers, times, text, model


def plain_chat(proxy, key: str = CLIENT_KEY):
    raw = client(proxy, key).chat.completions.with_raw_response.create(
        model="whatever-the-client-says", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    return raw.headers, raw.parse()


def read_flows(path) -> list:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def test_healthy_primary_streams_token_by_token_and_the_flow_is_recorded(simulators, proxies, tmp_path):
    primary = simulators()  # the physics preset: one token per ~25 ms
    fallback = simulators("--preset", "fallback")
    recording = tmp_path / "flows.mitm"
    proxy = proxies(profile(None, fallback.url), reverse=primary.url, args=["-w", str(recording)])

    headers, times, text, model = stream_chat(proxy, max_tokens=24)

    assert headers["x-llm-ha-upstream"] == "primary" and headers["x-llm-ha-attempts"] == "1"
    assert model == primary.model and text
    spread = times[-1] - times[0]
    assert spread > 0.3, f"chunks arrived within {spread:.3f}s: buffered, not streamed"
    assert fallback.stats()["requests"] == 0
    proxy.stop()
    (flow,) = read_flows(recording)
    assert flow.request.url == f"{proxy.url.replace('http://127.0.0.1:' + str(proxy.port), primary.url)}/v1/chat/completions"
    assert flow.request.host == "127.0.0.1" and flow.request.port == primary.port
    assert flow.request.headers["authorization"] == f"Bearer {CLIENT_KEY}"  # the client's real request
    body = flow.response.content.decode()
    assert body.count("data: ") >= 24 and "[DONE]" in body, "the streamed body is stored for replay"
    meta = flow.metadata["llm_ha"]
    assert meta["upstream"] == "primary" and [a["outcome"] for a in meta["attempts"]] == ["ok"]
    attempt = meta["attempts"][0]
    assert 0 < attempt["ttfb_s"] < attempt["duration_s"]
    assert flow.comment == f"primary {attempt['ttfb_s'] * 1000:.0f}ms", "who answered, and no failover"
    assert not flow.marked and flow.server_conn.address == ("127.0.0.1", primary.port), "the real node, not the hand-off"


def test_reverse_target_down_from_the_start_everything_served_by_the_fallback(simulators, proxies, closed_port):
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url), reverse=f"http://127.0.0.1:{closed_port}",
                    options={"connection_strategy": "eager"})
    for _ in range(3):
        headers, _, text, model = stream_chat(proxy)
        assert headers["x-llm-ha-upstream"] == "fallback" and model == "qwen-plus" and text
    headers, completion = plain_chat(proxy)
    assert headers["x-llm-ha-upstream"] == "fallback" and completion.model == "qwen-plus"
    assert fallback.stats()["requests"] == 4


def test_late_first_token_fails_over_and_the_primary_sees_its_connection_closed(simulators, proxies):
    primary = simulators("--no-physics", "--first-token-delay", "1.0")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))

    started = time.monotonic()
    headers, _, text, model = stream_chat(proxy)
    elapsed = time.monotonic() - started

    assert headers["x-llm-ha-upstream"] == "fallback" and headers["x-llm-ha-attempts"] == "2"
    assert model == "qwen-plus" and text
    assert elapsed < 0.9, f"the client waited {elapsed:.2f}s: the 200 ms limit did not cut the primary"
    primary.wait_for(lambda s: s["client_disconnects"] >= 1, timeout=5)


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"status": 429}, {"in_band_error": True},
                                   {"reset_after_chunks": 0}])
def test_upstream_errors_fail_over_transparently(simulators, proxies, fault):
    primary = simulators("--no-physics")
    primary.set_faults(**fault)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    headers, _, text, model = stream_chat(proxy)
    assert (headers["x-llm-ha-upstream"], headers["x-llm-ha-attempts"], model) == ("fallback", "2", "qwen-plus")
    assert text
    if "in_band_error" not in fault:  # non-streaming too
        headers, completion = plain_chat(proxy)
        assert headers["x-llm-ha-upstream"] == "fallback", "non-streaming requests fail over too"
        assert completion.model == "qwen-plus" and completion.choices[0].message.content


def test_a_client_error_is_returned_as_is_without_fallback(simulators, proxies):
    primary = simulators("--no-physics")
    primary.set_faults(status=400)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    with pytest.raises(openai.BadRequestError) as caught:
        stream_chat(proxy)
    assert caught.value.response.headers["x-llm-ha-upstream"] == "primary"
    assert caught.value.response.headers["x-llm-ha-attempts"] == "1"
    assert fallback.stats()["requests"] == 0
    node = proxy.node("primary")
    assert (node["state"], node["failures"], node["requests"]) == ("healthy", 0, 1), "a 4xx is not the node's fault"


@pytest.mark.parametrize("kind,status,code", [
    ("refused", 503, "no_upstream_available"),
    ("slow", 504, "upstream_timeout"),
    ("500", 502, "all_upstreams_failed"),
])
def test_all_down_gives_a_well_formed_openai_error(simulators, proxies, closed_port, kind, status, code):
    if kind == "refused":
        urls = [f"http://127.0.0.1:{closed_port}", f"http://127.0.0.1:{closed_port + 1 if closed_port < 65535 else 1}"]
    else:
        sims = [simulators("--no-physics"), simulators("--no-physics")]
        for sim in sims:
            sim.set_faults(**({"first_token_delay": 2} if kind == "slow" else {"status": 500}))
        urls = [s.url for s in sims]
    text = profile(urls[0], urls[1]).replace("first_byte_timeout: 5s", "first_byte_timeout: 300ms")
    proxy = proxies(text)
    response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=10,
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-llm-ha-upstream"] == "none" and response.headers["x-llm-ha-attempts"] == "2"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == code
    with pytest.raises(openai.APIStatusError) as caught:
        stream_chat(proxy)
    assert caught.value.status_code == status


def test_model_and_key_are_rewritten_per_upstream_and_the_clients_key_never_reaches_the_fallback(
        simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    extra_primary_key = profile(primary.url, fallback.url).replace(
        "    model: primary-model-name", f'    model: primary-model-name\n    api_key: "{PRIMARY_KEY}"')
    proxy = proxies(profile(primary.url, fallback.url))
    stream_chat(proxy)
    seen = primary.stats()["last_request"]
    assert seen["model"] == "primary-model-name"
    assert seen["authorization"] == f"Bearer {CLIENT_KEY}", "no key of its own: the primary gets the client's"

    primary.set_faults(status=500)
    stream_chat(proxy)
    seen = fallback.stats()["last_request"]
    assert seen["model"] == "qwen-plus" and seen["authorization"] == f"Bearer {FALLBACK_KEY}"

    proxy.stop()
    primary.clear_faults()
    proxy = proxies(extra_primary_key)
    stream_chat(proxy)
    assert primary.stats()["last_request"]["authorization"] == f"Bearer {PRIMARY_KEY}"
    output = proxy.stop()
    assert PRIMARY_KEY not in output and FALLBACK_KEY not in output


def test_the_clients_key_is_not_sent_to_the_fallback_even_when_the_primary_is_ejected(simulators, proxies):
    fallback = simulators("--preset", "fallback")
    primary = simulators("--no-physics")
    primary.set_faults(status=500)
    text = profile(primary.url, fallback.url).replace(f'    api_key: "{FALLBACK_KEY}"\n', "")
    proxy = proxies(text)
    stream_chat(proxy)
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=5)
    headers, *_ = stream_chat(proxy)
    assert headers["x-llm-ha-attempts"] == "1"
    assert fallback.stats()["last_request"]["authorization"] is None


def test_a_stream_cut_after_the_first_token_reaches_the_client_as_a_broken_stream(simulators, proxies):
    primary = simulators("--no-physics")
    primary.set_faults(reset_after_chunks=3)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        stream_chat(proxy)
    node = proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["requests"] >= 2)["upstreams"][0]["nodes"][0]
    assert node["failures"] == 1 and node["inflight"] == 0
    assert fallback.stats()["requests"] == 0, "bytes had reached the client: no retry"


def test_client_disconnect_closes_the_upstream_stream(simulators, proxies):
    primary = simulators("--max-batch", "4")  # physics: ~25 ms a token
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 400,
                       "messages": [{"role": "user", "content": "long"}]}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n".encode()
                     + b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:  # headers may come in a segment of their own
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection before the first token"
            received += chunk
    primary.wait_for(lambda s: s["client_disconnects"] == 1 and s["in_flight"] == 0, timeout=5)
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["inflight"] == 0, timeout=5)


def test_flows_outside_the_match_pass_through_untouched(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url, extra='match: "~u /v1/chat/"\n'), reverse=primary.url)
    response = httpx.get(f"{proxy.url}/v1/models", timeout=5)
    assert response.status_code == 200 and "x-llm-ha-upstream" not in response.headers
    assert primary.stats()["last_request"]["path"] == "/v1/models"


def test_without_a_profile_the_addon_is_inert_and_says_so_once(simulators, proxies):
    primary = simulators("--no-physics")
    proxy = proxies(None, reverse=primary.url)
    for _ in range(2):
        headers, _, text, _ = stream_chat(proxy)
        assert "x-llm-ha-upstream" not in headers and text
    assert proxy.stop().count("no llm_ha_profile set") == 1


@pytest.mark.parametrize("text,expected", [
    ("upstreams: []\n", "upstreams: needs a list of at least one upstream"),
    ("colour: red\nupstreams: [{name: a, nodes: ['http://127.0.0.1:1']}]\n", "colour: unknown key"),
    ("first_byte_timeout: soon\nupstreams: [{name: a, nodes: ['http://127.0.0.1:1']}]\n",
     "first_byte_timeout: bad duration 'soon'"),
    ("health_check: {failure_rate_threshold: 101}\nupstreams: [{name: a, nodes: ['http://127.0.0.1:1']}]\n",
     "health_check.failure_rate_threshold: needs a percentage from 1 to 100"),
    ("upstreams: [{name: a, nodes: ['http://127.0.0.1:1'], api_key: '${LLM_HA_TEST_UNSET}'}]\n",
     "upstreams[0].api_key: environment variable LLM_HA_TEST_UNSET is not set"),
    ("match: '~zz'\nupstreams: [{name: a, nodes: ['http://127.0.0.1:1']}]\n", "match: not a valid mitmproxy filter"),
])
def test_a_bad_profile_stops_mitmdump_with_one_line(proxies, text, expected):
    proxy = proxies(text, wait=False)
    proxy.process.wait(30)
    output = proxy.output()
    assert proxy.process.returncode != 0
    lines = [line for line in output.splitlines() if expected in line]
    assert len(lines) == 1, output
    assert "profile-0.yaml: " in lines[0]
    assert "Traceback" not in output


def test_regular_proxy_mode_the_match_selects_llm_flows(simulators, proxies):
    primary = simulators("--no-physics")
    primary.set_faults(status=500)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as via_proxy:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        response = via_proxy.post(f"{primary.url}/v1/chat/completions", json=body)
        assert response.headers["x-llm-ha-upstream"] == "fallback" and "data: " in response.text
        other = via_proxy.get(f"{primary.url}/health")  # not an LLM flow: passes through as is
        assert other.status_code == 500 and "x-llm-ha-upstream" not in other.headers


def test_upstream_proxy_mode_attempts_go_through_the_upstream_proxy(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    outer = proxies(None, status=False, options={"stream_large_bodies": "1", "flow_detail": 1})
    proxy = proxies(profile(primary.url, fallback.url).replace("200ms", "2s"),
                    args=["--mode", f"upstream:{outer.url}"])
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as via_proxy:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        response = via_proxy.post(f"{primary.url}/v1/chat/completions", json=body)
    assert response.headers["x-llm-ha-upstream"] == "primary" and "data: " in response.text
    log = outer.stop()
    assert f"POST {primary.url}/v1/chat/completions" in log, "llm-ha's attempt went through the upstream proxy"
    assert "handoff" not in log, "the loopback hand-off never goes through the upstream proxy"


def test_a_script_reload_lets_streams_in_flight_finish(simulators, proxies, tmp_path):
    import shutil as _shutil

    from llmbench.proxy import ADDON
    primary = simulators()  # physics: ~25 ms a token
    fallback = simulators("--preset", "fallback")
    script = tmp_path / "llm_ha.py"
    _shutil.copy(ADDON, script)
    script.write_text(f"import sys; sys.path.insert(0, {str(ADDON.parent)!r})\n" + script.read_text())
    proxy = proxies(profile(primary.url, fallback.url), script=script)
    body = {"model": "m", "stream": True, "max_tokens": 120, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=20) as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        script.write_text(script.read_text() + "\n# touched\n")  # mitmproxy reloads it within a second
        rest = b"".join(chunks)
    text = (first + rest).decode()
    assert text.count("data: ") >= 120 and "[DONE]" in text
    assert "Loading script" in proxy.output() and proxy.output().count("Loading script") >= 2
