"""Broken upstreams and impatient clients: the proxy answers well-formed, and leaks nothing."""

import asyncio
import json
import os
import socket

import httpx
import pytest

pytestmark = pytest.mark.e2e

FAULTS = [{"status": 500}, {"reset_after_chunks": 2}, {"first_token_delay": 0.5}, {"in_band_error": True},
          {"reset_after_chunks": 0}, {"refuse": True}, {}]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def burst(url: str, n: int) -> list[int]:
    body = {"model": "m", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(timeout=15, trust_env=False) as client:
        async def one(i: int) -> int:
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        if i % 3 == 0:
                            break  # an impatient client: leaves after the first bytes
                    return response.status_code
            except httpx.HTTPError:
                return -1  # a stream cut after its first bytes reaches the client as a broken stream
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_mixed_faults_and_disconnects_leave_no_stream_open(simulators, proxies):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(f"""
first_byte_timeout: 300ms
health_check: {{interval: 0.2s, base_ejection_time: 0.4s, max_ejection_time: 0.4s}}
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
  - name: fallback
    nodes: ["{fallback.url}"]
    first_byte_timeout: 5s
""")
    asyncio.run(burst(proxy.url, 5))  # warm up pools and lazy imports
    baseline = open_fds(proxy.process.pid)
    statuses = []
    for fault in FAULTS:
        primary.clear_faults()
        primary.set_faults(**fault)
        statuses += asyncio.run(burst(proxy.url, 12))
    primary.clear_faults()
    primary.set_faults(refuse=False)
    assert set(statuses) <= {200, -1}, f"every answer well-formed: {sorted(set(statuses))}"
    assert statuses.count(-1) <= 12 * 2, "only streams cut after their first bytes may break"

    status = proxy.wait_for(lambda s: all(n["inflight"] == 0 for u in s["upstreams"] for n in u["nodes"]),
                            timeout=10)
    assert status["upstreams"][1]["nodes"][0]["requests"] > 0
    grown = open_fds(proxy.process.pid) - baseline
    assert grown <= 12, f"mitmdump holds {grown} more file descriptors than after warm-up"
    fallback.wait_for(lambda s: s["in_flight"] == 0, timeout=5)
    primary.wait_for(lambda s: s["in_flight"] == 0, timeout=5)


def test_garbage_from_an_upstream_gives_a_well_formed_error(proxies, simulators):
    fallback = simulators("--preset", "fallback")
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(8)
    port = garbage.getsockname()[1]

    import threading

    def answer_garbage():
        for _ in range(4):
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"this is not HTTP\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        proxy = proxies(f"""
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:{port}"]
  - name: fallback
    nodes: ["{fallback.url}"]
""")
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 200 and response.headers["x-llm-ha-upstream"] == "fallback"
        assert json.loads(response.text.split("data: ", 1)[1].split("\n", 1)[0])["model"] == "qwen-plus"
    finally:
        garbage.close()
