"""What a careless user and an attacker found (issue 17): each defect and rough edge, end to end.

Real mitmdump with llm-ha, simulators where they can misbehave as needed, raw asyncio fake upstreams
(`support/fake_upstream.py`) where they cannot: a hang without headers, gzip despite `identity`, a
WebSocket's 101, an HTML page, a JSON body cut short.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import openai
import pytest

from support.fake_upstream import (
    FakeUpstream,
    Request,
    answers_chat,
    gzips,
    hang,
    html_page,
    json_error_object,
    rate_limited,
    truncated_json,
    websocket_echo,
    websocket_frame,
)

pytestmark = pytest.mark.e2e

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def fakes():
    """`fakes(behaviour)` starts a fake upstream; all are stopped after the test."""
    started = []

    def start(behaviour) -> FakeUpstream:
        fake = FakeUpstream(behaviour)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def profile(primary: str | None, *fallbacks: str, first_byte: str = "300ms", top: str = "",
            fallback_keys: tuple[str | None, ...] = ()) -> str:
    nodes = f'\n    nodes: ["{primary}"]' if primary else ""
    text = f"""
first_byte_timeout: {first_byte}
request_timeout: 30s
health_check: {{interval: 0.5s, base_ejection_time: 30s}}
{top}
upstreams:
  - name: primary{nodes}
"""
    for i, url in enumerate(fallbacks):
        key = fallback_keys[i] if i < len(fallback_keys) else None
        text += f"""  - name: fallback{i + 1 if len(fallbacks) > 1 else ""}
    nodes: ["{url}"]
    first_byte_timeout: 5s
"""
        if key:
            text += f'    api_key: "{key}"\n'
    return text


def post_chat(proxy, body: dict | None = None, timeout: float = 10, **kwargs) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body or CHAT, timeout=timeout, trust_env=False,
                      **kwargs)


def raw_request(proxy, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


def send_and_leave(proxy, body: dict, after: float) -> None:
    """A client that sends its request and hangs up `after` seconds later, before any answer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(raw_request(proxy, body))
        time.sleep(after)


# -- defect 1: a hung upstream blocks non-streaming requests

def test_a_hanging_primary_costs_a_non_streaming_request_only_its_first_byte_timeout(fakes, simulators, proxies):
    primary = fakes(hang)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-x", max_retries=0, timeout=8)

    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=5)
    took = time.monotonic() - started
    completion = raw.parse()

    assert raw.headers["x-llm-ha-upstream"] == "fallback" and took < 2.0, took
    assert completion.object == "chat.completion" and completion.model == "qwen-plus"
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=3)


def test_non_streaming_answers_are_assembled_from_the_stream_whole(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url), reverse=primary.url)
    direct = httpx.post(f"{primary.url}/v1/chat/completions", json={**CHAT, "max_tokens": 7}, timeout=10).json()

    answer = post_chat(proxy, {**CHAT, "max_tokens": 7})

    assert answer.headers["x-llm-ha-upstream"] == "primary"
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["object"] == "chat.completion" and body["model"] == direct["model"]
    assert body["choices"][0]["message"] == direct["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == direct["usage"]


def test_a_non_streaming_request_whose_primary_stalls_midway_is_answered_whole_by_the_fallback(simulators, proxies):
    primary = simulators("--no-physics", "--stall-after-chunks", "2", "--stall-seconds", "30")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, top="stream_idle_timeout: 1s"))

    started = time.monotonic()
    answer = post_chat(proxy)

    assert answer.headers["x-llm-ha-upstream"] == "fallback" and time.monotonic() - started < 3, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 5
    assert proxy.node("primary")["failures"] == 1


# -- defect 2: a client that goes away does not cancel its upstream attempt

def test_a_client_leaving_closes_its_non_streaming_attempt_at_once(simulators, proxies):
    primary = simulators("--preset", "fallback", "--token-time", "0.05", "--model", "slow")  # 100 tokens: 5 s
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, first_byte="2s"))

    send_and_leave(proxy, {**CHAT, "max_tokens": 100}, after=0.5)

    primary.wait_for(lambda s: s["client_disconnects"] == 1 and s["in_flight"] == 0, timeout=1.5)
    node = proxy.node("primary")
    assert node["inflight"] == 0 and node["failures"] == 0 and node["requests"] == 0, node
    assert fallback.stats()["requests"] == 0


def test_clients_leaving_before_the_first_token_cause_no_failover_and_no_ejection(simulators, proxies):
    primary = simulators("--no-physics", "--first-token-delay", "1.5")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, first_byte="800ms"))

    for _ in range(5):
        send_and_leave(proxy, {**CHAT, "stream": True}, after=0.2)
    time.sleep(1.2)  # past the first-byte timeout the abandoned attempts would have had

    assert fallback.stats()["requests"] == 0, "no fallback attempt for a client that is gone"
    primary.wait_for(lambda s: s["client_disconnects"] == 5 and s["in_flight"] == 0, timeout=2)
    node = proxy.node("primary")
    assert node["state"] == "healthy" and node["failures"] == 0 and node["inflight"] == 0, node
    assert "client left" in proxy.output()


# -- defect 3: WebSockets under the match

def test_a_websocket_upgrade_passes_through_untouched(fakes, simulators, proxies):
    primary = fakes(websocket_echo)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url), reverse=primary.url)

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"GET /v1/realtime?model=m HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        answer = _read_until(sock, b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101"), answer
        assert b"x-llm-ha" not in answer.lower()
        sock.sendall(websocket_frame("ping", mask=b"\x01\x02\x03\x04"))
        assert _read_exactly(sock, 6) == websocket_frame("ping")

    assert primary.requests[0].headers["upgrade"] == "websocket"
    node = proxy.node("primary")
    assert node["requests"] == 0 and node["state"] == "healthy", node
    assert fallback.stats()["requests"] == 0


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while end not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- defect 4: every upstream answers 429

def test_when_every_upstream_rate_limits_the_client_gets_429_with_the_shortest_retry_after(fakes, proxies):
    primary = fakes(rate_limited("30"))
    fallback = fakes(rate_limited("8", retry_after_ms="6500"))
    proxy = proxies(profile(primary.url, fallback.url))

    answer = post_chat(proxy)

    assert answer.status_code == 429, answer.text
    assert answer.headers["retry-after"] == "7" and answer.headers["retry-after-ms"] == "6500"
    assert answer.json()["error"]["code"] == "rate_limited"
    assert answer.headers["x-llm-ha-attempts"] == "2"


# -- defect 5: regular and upstream proxy modes

def test_in_regular_mode_the_default_match_takes_only_flows_to_the_primary(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    other = simulators("--no-physics", "--model", "someone-elses-model")
    proxy = proxies(profile(primary.url, fallback.url))  # no reverse: mitmproxy's regular mode

    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
        elsewhere = client.post(f"{other.url}/v1/chat/completions", json=CHAT,
                                headers={"authorization": "Bearer sk-for-the-other-host"})
        to_primary = client.post(f"{primary.url}/v1/chat/completions", json=CHAT)

    assert "x-llm-ha-upstream" not in elsewhere.headers
    assert elsewhere.json()["model"] == "someone-elses-model"
    assert other.stats()["requests"] == 1 and other.stats()["last_request"]["authorization"] == "Bearer sk-for-the-other-host"
    assert to_primary.headers["x-llm-ha-upstream"] == "primary"
    assert primary.stats()["requests"] == 1


# -- defect 6: gzip from an upstream that ignores accept-encoding: identity

def test_a_gzipping_upstream_is_gated_and_its_answers_reach_the_client_readable(fakes, simulators, proxies):
    primary = fakes(gzips())
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, first_byte="2s"))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-x", max_retries=0, timeout=8)

    started = time.monotonic()
    stream = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert time.monotonic() - started < 1.5
    assert stream.headers["x-llm-ha-upstream"] == "primary" and text == "Hello there"

    plain = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert plain.headers["x-llm-ha-upstream"] == "primary"
    assert plain.parse().choices[0].message.content == "Hello there"

    other = httpx.post(f"{proxy.url}/v1/embeddings", json={"model": "m", "input": "x"}, timeout=8)  # not assembled
    assert "content-encoding" not in other.headers and other.json()["choices"][0]["message"]["content"] == "Hello there"

    node = proxy.node("primary")
    assert node["failures"] == 0 and node["state"] == "healthy", node


# -- defect 7: stream_large_bodies sends every request twice

def test_with_stream_large_bodies_each_request_reaches_the_primary_once(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url), reverse=primary.url, options={"stream_large_bodies": "1"})

    assert post_chat(proxy).headers["x-llm-ha-upstream"] == "primary"
    assert post_chat(proxy, {**CHAT, "stream": True}).headers["x-llm-ha-upstream"] == "primary"

    assert primary.stats()["requests"] == 2
    assert fallback.stats()["requests"] == 0


# -- defect 8: credential-like headers reach fallback providers

SECRETS = {"authorization": "Bearer sk-client-secret", "cookie": "session=cookie-secret",
           "openai-organization": "org-secret", "openai-project": "proj-secret", "x-goog-api-key": "goog-secret",
           "x-api-key": "x-api-secret", "api-key": "azure-secret"}


def test_a_fallback_gets_none_of_the_clients_credentials_with_or_without_a_key_of_its_own(fakes, simulators, proxies):
    primary = simulators("--no-physics", "--status", "500")
    keyless = fakes(rate_limited("1"))
    keyed = fakes(answers_chat())
    proxy = proxies(profile(primary.url, keyless.url, keyed.url, fallback_keys=(None, "sk-fallback-own")))

    answer = post_chat(proxy, headers={**SECRETS, "user-agent": "hardening-test"})

    assert answer.headers["x-llm-ha-upstream"] == "fallback2", answer.text
    assert primary.stats()["last_request"]["authorization"] == SECRETS["authorization"]  # the one it addressed
    for fake, key in ((keyless, None), (keyed, "Bearer sk-fallback-own")):
        headers = fake.requests[0].headers
        assert headers.get("authorization") == key
        assert headers["user-agent"] == "hardening-test"
        leaked = [name for name, value in SECRETS.items() if value in headers.values()]
        assert not leaked, f"{fake.url} got the client's {leaked}"


# -- rough edges

def test_a_stream_value_that_is_not_a_boolean_is_gated_as_what_the_upstream_does(simulators, proxies):
    primary = simulators("--no-physics", "--first-token-delay", "1.0")  # streams on any truthy "stream"
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url), reverse=primary.url)

    started = time.monotonic()
    answer = post_chat(proxy, {**CHAT, "stream": "yes"})

    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["x-llm-ha-upstream"] == "fallback" and time.monotonic() - started < 0.9
    assert "data: [DONE]" in answer.text


@pytest.mark.parametrize("behaviour", [html_page, json_error_object, truncated_json],
                         ids=["html-page", "json-error-object", "truncated-json"])
def test_a_2xx_that_is_no_answer_fails_over(behaviour, fakes, simulators, proxies):
    primary = fakes(behaviour)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url))

    answer = post_chat(proxy)
    streamed = post_chat(proxy, {**CHAT, "stream": True})

    assert answer.headers["x-llm-ha-upstream"] == "fallback", answer.text
    assert answer.json()["object"] == "chat.completion"
    assert streamed.headers["x-llm-ha-upstream"] == "fallback", streamed.text
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["failures"] == 2, timeout=3)


def test_a_bad_status_address_is_one_line_and_a_public_one_is_warned_about(proxies, simulators):
    fallback = simulators("--preset", "fallback")
    bad = proxies(profile("http://127.0.0.1:1", fallback.url), status=False, wait=False,
                  options={"llm_ha_status": "garbage"})
    bad.process.wait(timeout=30)
    output = bad.output()
    assert "llm-ha: llm_ha_status: needs HOST:PORT" in output and "Traceback" not in output, output

    public = proxies(profile("http://127.0.0.1:1", fallback.url), status=False,
                     options={"llm_ha_status": f"0.0.0.0:{_free_port()}"})
    _wait_for_line(public, "has no authentication")
    local = proxies(profile("http://127.0.0.1:1", fallback.url))
    assert "has no authentication" not in local.output()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_line(proxy, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.output():
        assert time.monotonic() < deadline, f"{text!r} not in mitmdump's output:\n{proxy.output()}"
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_failover_is_one_line_in_mitmdumps_default_output(simulators, proxies, stream):
    primary = simulators("--no-physics", "--status", "503")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url), options={"termlog_verbosity": "info"})

    assert post_chat(proxy, {**CHAT, "stream": stream}).headers["x-llm-ha-upstream"] == "fallback"

    _wait_for_line(proxy, "llm-ha: POST /v1/chat/completions:")
    line = next(line for line in proxy.output().splitlines() if "llm-ha: POST /v1/chat/completions:" in line)
    assert "fallback" in line and "primary http_error 503" in line, line


# -- regression: nothing leaks after the whole batch

def chaos(request: Request, writer: asyncio.StreamWriter):
    """One fake primary with every misbehaviour, chosen per request by the `x-fake` header."""
    behaviours = {"hang": hang, "gzip": gzips(), "html": html_page, "error": json_error_object,
                  "truncated": truncated_json, "429": rate_limited("1"), "ok": answers_chat(),
                  "websocket": websocket_echo}
    return behaviours[request.headers.get("x-fake", "ok")](request, writer)


async def chaos_batch(proxy) -> None:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        async def one(kind: str, stream: bool, leave: bool) -> None:
            body = {**CHAT, "stream": stream}
            try:
                async with asyncio.timeout(0.3 if leave else 10):
                    response = await client.post(f"{proxy.url}/v1/chat/completions", json=body,
                                                 headers={"x-fake": kind})
                    assert response.status_code in (200, 429), (kind, stream, response.status_code)
            except TimeoutError:
                assert leave

        kinds = ["hang", "gzip", "html", "error", "truncated", "429", "ok"]
        await asyncio.gather(*(one(kind, stream, leave) for kind in kinds for stream in (False, True)
                               for leave in (False, True)))
    await asyncio.to_thread(_websocket_round_trip, proxy)


def _websocket_round_trip(proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"x-fake: websocket\r\n\r\n")
        assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        sock.sendall(websocket_frame("x", mask=b"abcd"))
        assert _read_exactly(sock, 3) == websocket_frame("x")


def test_after_the_whole_batch_fds_inflight_and_memory_return_to_baseline(fakes, simulators, proxies):
    primary = fakes(chaos)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(None, fallback.url, top="health_check: {min_requests: 100000}"), reverse=primary.url)
    pid = proxy.process.pid

    asyncio.run(chaos_batch(proxy))  # warm-up: pools, imports, first allocations
    idle = lambda s: all(n["inflight"] == 0 for u in s["upstreams"] for n in u["nodes"])
    proxy.wait_for(idle, timeout=10)
    time.sleep(0.5)
    fds, rss = _open_fds(pid), _rss_mb(pid)

    for _ in range(4):
        asyncio.run(chaos_batch(proxy))
    status = proxy.wait_for(idle, timeout=10)

    assert status["upstreams"][0]["nodes"][0]["requests"] > 0
    # Keep-alive pools (to the nodes, the hand-off) come and go by a few; a leak grows with every batch.
    _poll(lambda: _open_fds(pid) - fds <= 12, lambda: f"{_open_fds(pid) - fds} more fds than after warm-up", 10)
    assert _rss_mb(pid) - rss < 25, f"RSS grew by {_rss_mb(pid) - rss:.1f} MB over 4 batches"
    fallback.wait_for(lambda s: s["in_flight"] == 0, timeout=5)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _poll(check, describe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, describe()
        time.sleep(0.2)


def test_a_slow_reader_holds_the_upstream_back_instead_of_filling_memory(simulators, proxies):
    """Backpressure through the hand-off: a client reading a long fast stream slowly must slow the upstream
    down; without it mitmdump would buffer the whole answer (about 45 MB here)."""
    primary = simulators("--no-physics", "--max-output-tokens", "200000")
    proxy = proxies(f"""
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
""", reverse=primary.url)
    pid = proxy.process.pid
    rss = _rss_mb(pid)

    async def slow_reader() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = json.dumps({"model": "m", "stream": True, "max_tokens": 200000,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(body), body))
        got = 0
        for _ in range(300):  # 3 s, 4 KiB every 10 ms: about 1.2 MB read
            got += len(await reader.read(4096))
            await asyncio.sleep(0.01)
        writer.close()
        return got

    got = asyncio.run(slow_reader())
    assert got > 100_000
    grown = _rss_mb(pid) - rss
    assert grown < 20, f"RSS grew by {grown:.1f} MB while a client read slowly"
    assert primary.stats()["completed"] == 0, "the upstream must have been held back, not read to the end"
