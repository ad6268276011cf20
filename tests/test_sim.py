"""The simulated LLM servers (llmsim.server) and the load generator (llmsim.loadgen), as real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llmsim.loadgen import Phase, arrival_schedule, parse_phases, read_records, run_load, summarize
from llmsim.control import SimulatorError, start_simulator

pytestmark = pytest.mark.e2e

SERVED = "DeepSeek-R1-Distill-Qwen-7B"
CHAT = "/v1/chat/completions"


def chat_body(max_tokens: int = 8, stream: bool = True, **extra) -> dict:
    return {"model": "asked-model", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens, "stream": stream, **extra}


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


async def first_token_time(url: str, max_tokens: int = 10, client: httpx.AsyncClient | None = None):
    """(seconds to the first SSE event, number of events) of one streamed request."""
    if client is None:
        async with httpx.AsyncClient(timeout=30) as client:
            return await first_token_time(url, max_tokens, client)
    start = time.monotonic()
    ttft, events = None, 0
    async with client.stream("POST", url + CHAT, json=chat_body(max_tokens)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events += 1
                ttft = ttft if ttft is not None else time.monotonic() - start
    return ttft, events


async def concurrently(url: str, count: int, max_tokens: int) -> list[tuple[float, float]]:
    """(time to first token, duration) of `count` requests sent at once on one client."""
    async def one(client):
        start = time.monotonic()
        ttft, _ = await first_token_time(url, max_tokens, client)
        return ttft, time.monotonic() - start

    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(one(client) for _ in range(count)))


@pytest.fixture(scope="module")
def ideal_sim():
    """An ideal server (no physics) shared by the fault tests; faults are cleared after each test."""
    with start_simulator("--no-physics") as sim:
        yield sim


@pytest.fixture
def ideal(ideal_sim):
    yield ideal_sim
    ideal_sim.clear_faults()


# -- answers

def test_streaming_answer_names_the_served_model(ideal):
    body = chat_body(5, stream_options={"include_usage": True})
    response = httpx.post(ideal.url + CHAT, json=body, headers={"authorization": "Bearer sk-test"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5 + 2  # one token each, the finish chunk, the usage chunk
    assert {c["model"] for c in chunks} == {SERVED}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "lorem"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:5]) == "lorem ipsum dolor sit amet"
    assert chunks[5]["choices"][0]["finish_reason"] == "length"
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 5
    last = ideal.stats()["last_request"]
    assert last == {"method": "POST", "path": CHAT, "model": "asked-model", "authorization": "Bearer sk-test"}


def test_non_streaming_answer_and_models(ideal):
    client = openai.OpenAI(base_url=ideal.url + "/v1", api_key="k", max_retries=0)
    answers = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4) for _ in range(2)]
    assert answers[0].model == SERVED
    assert answers[0].choices[0].message.content == "lorem ipsum dolor sit"
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.completion_tokens == 4
    assert [m.id for m in client.models.list()] == [SERVED]


# -- physics

def test_queueing_beyond_the_batch_raises_time_to_first_token(simulators):
    sim = simulators("--max-batch", "2", "--token-time", "0.05", "--batch-alpha", "0",
                     "--prefill-time", "0.005", "--prefill-per-token", "0")

    ttfts = sorted(t for t, _ in asyncio.run(concurrently(sim.url, 6, max_tokens=10)))
    # Two run at once for 10 steps of 50 ms; the next pair waits 0.5 s, the last pair 1 s.
    assert ttfts[1] < 0.3 and ttfts[2] > 0.4 and ttfts[4] > 0.85, ttfts
    stats = sim.stats()
    assert stats["peak_batch"] == 2 and stats["peak_queue"] >= 3
    assert stats["completed"] == 6 and stats["in_flight"] == 0


def test_per_token_time_grows_with_the_batch(simulators):
    sim = simulators("--max-batch", "8", "--token-time", "0.01", "--batch-alpha", "0.5",
                     "--prefill-time", "0", "--prefill-per-token", "0")

    alone = asyncio.run(concurrently(sim.url, 1, max_tokens=20))[0][1]
    crowded = max(d for _, d in asyncio.run(concurrently(sim.url, 8, max_tokens=20)))
    # 20 steps: 10 ms alone, 10 ms * (1 + 0.5 * 7) = 45 ms with 8 in the batch.
    assert alone < 0.5 and crowded > 2.5 * alone, (alone, crowded)


def test_crash_past_the_memory_limit_and_restart(simulators):
    # Time scale 0.01: a 50 ms token, a 1.5 s restart. Base 1000 + 100 per request: the 4th crashes it.
    sim = simulators("--max-batch", "2", "--base-memory", "1000", "--request-memory", "100",
                     "--memory-limit", "1350", "--token-time", "5", "--prefill-time", "0",
                     "--restart-time", "150", "--time-scale", "0.01")
    assert sim.startup["time_scale"] == 0.01

    async def scenario():
        async with httpx.AsyncClient(timeout=10) as client:
            streams = [asyncio.create_task(read_stream(client, sim.url)) for _ in range(3)]
            await asyncio.to_thread(sim.wait_for, lambda s: s["in_flight"] == 3 and s["running"] == 2)
            assert sim.stats()["memory_used_mb"] == 1300
            fourth = asyncio.create_task(read_stream(client, sim.url))
            return await asyncio.gather(*streams, fourth)

    crash_seen = time.monotonic()
    results = asyncio.run(scenario())
    assert all(isinstance(r, httpx.TransportError) for r in results), results
    stats = sim.stats()
    assert stats["crashes"] == 1 and not stats["up"] and stats["in_flight"] == 0
    assert stats["memory_used_mb"] == 1000 and stats["resets"] == 4 and stats["client_disconnects"] == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(sim.url + CHAT, json=chat_body(1, stream=False))

    stats = sim.wait_for(lambda s: s["up"], timeout=10)
    assert time.monotonic() - crash_seen > 1.2
    answer = httpx.post(sim.url + CHAT, json=chat_body(2, stream=False))
    assert answer.status_code == 200 and answer.json()["model"] == SERVED
    assert sim.stats()["crashes"] == 1

    sim.crash()  # forced
    stats = sim.stats()
    assert stats["crashes"] == 2 and not stats["up"] and len(stats["crash_times"]) == 2


async def read_stream(client: httpx.AsyncClient, url: str):
    """Read one long stream to its end; the exception instead if it breaks."""
    try:
        async with client.stream("POST", url + CHAT, json=chat_body(1000)) as response:
            async for _ in response.aiter_bytes():
                pass
        return response.status_code
    except httpx.TransportError as exc:
        return exc


def test_slow_start_after_a_start(simulators):
    sim = simulators("--no-physics", "--slow-start", "2")
    started = time.monotonic()
    early, _ = asyncio.run(first_token_time(sim.url, 2))
    elapsed = time.monotonic() - started
    assert early > 0.9 * (1 - elapsed / 2) - 0.05, (early, elapsed)
    time.sleep(max(0.0, 2.1 - (time.monotonic() - started)))
    late, _ = asyncio.run(first_token_time(sim.url, 2))
    assert late < 0.1


# -- fault switches

@pytest.mark.parametrize("status, error", [(429, openai.RateLimitError), (500, openai.InternalServerError),
                                           (400, openai.BadRequestError)])
def test_status_fault(ideal, status, error):
    ideal.set_faults(status=status)
    client = openai.OpenAI(base_url=ideal.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(error) as caught:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert caught.value.status_code == status
    assert set(caught.value.body) >= {"message", "type", "code"}
    assert ideal.stats()["by_status"][str(status)] >= 1


def test_error_rate_fault(ideal):
    ideal.set_faults(error_rate=0.5)
    statuses = [httpx.post(ideal.url + CHAT, json=chat_body(1, stream=False)).status_code for _ in range(40)]
    assert set(statuses) == {200, 500} and 8 <= statuses.count(500) <= 32
    ideal.set_faults(error_rate=1.0)
    assert httpx.post(ideal.url + CHAT, json=chat_body(1)).status_code == 500


def test_in_band_error_fault(ideal):
    ideal.set_faults(in_band_error=True)
    response = httpx.post(ideal.url + CHAT, json=chat_body(4))
    assert response.status_code == 200
    assert "error" in json.loads(sse_data(response.text)[0])
    client = openai.OpenAI(base_url=ideal.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError, match="in-band"):
        for _ in client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                stream=True):
            pass


def test_first_token_delay_fault(ideal):
    ideal.set_faults(first_token_delay=0.3)
    ttft, events = asyncio.run(first_token_time(ideal.url, 3))
    assert 0.3 <= ttft < 1.0 and events == 3 + 2


def test_reset_after_chunks_fault(ideal):
    ideal.set_faults(reset_after_chunks=3)
    resets = ideal.stats()["resets"]
    received = []
    with pytest.raises(httpx.TransportError):
        with httpx.stream("POST", ideal.url + CHAT, json=chat_body(10)) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert len(received) == 3
    with pytest.raises(httpx.TransportError):  # non-streaming: cut instead of answered
        httpx.post(ideal.url + CHAT, json=chat_body(10, stream=False))
    stats = ideal.stats()
    assert stats["resets"] == resets + 2 and stats["client_disconnects"] == 0


def test_refuse_fault_closes_the_port_and_reopens_it(ideal):
    with httpx.Client(timeout=5) as client:  # keeps its connection alive between requests
        assert client.post(ideal.url + CHAT, json=chat_body(1, stream=False)).status_code == 200
        ideal.set_faults(refuse=True)
        with pytest.raises(httpx.ConnectError):
            client.post(ideal.url + CHAT, json=chat_body(1, stream=False))
        stats = ideal.stats()  # the control port still answers
        assert not stats["up"] and not stats["listening"] and stats["crashes"] == 0
        ideal.set_faults(refuse=False)
        assert client.post(ideal.url + CHAT, json=chat_body(1, stream=False)).status_code == 200
    assert ideal.stats()["up"]


def test_bad_fault_is_refused(ideal):
    with pytest.raises(SimulatorError, match="error_rat"):
        ideal.set_faults(error_rat=1)
    with pytest.raises(SimulatorError, match="error_rate"):
        ideal.set_faults(error_rate=2)


# -- client disconnects

def test_client_disconnect_mid_stream_is_counted_and_frees_memory(simulators):
    sim = simulators("--token-time", "0.02")
    base = sim.stats()["memory_used_mb"]
    with httpx.stream("POST", sim.url + CHAT, json=chat_body(500)) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert sim.stats()["memory_used_mb"] > base
    stats = sim.wait_for(lambda s: s["client_disconnects"] == 1 and s["in_flight"] == 0, timeout=5)
    assert stats["memory_used_mb"] == base and stats["running"] == 0 and stats["completed"] == 0


def test_client_disconnect_before_the_first_token_is_counted(ideal):
    ideal.set_faults(first_token_delay=5)
    before = ideal.stats()["client_disconnects"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(ideal.url + CHAT, json=chat_body(2), timeout=0.2)
    ideal.wait_for(lambda s: s["client_disconnects"] == before + 1 and s["in_flight"] == 0, timeout=5)


# -- simulator start-up

def test_start_failure_reports_stderr():
    with pytest.raises(SimulatorError, match="error_rate"):
        start_simulator("--error-rate", "3")


def test_fallback_preset():
    with start_simulator("--preset", "fallback") as sim:
        assert sim.model == "qwen-plus"
        stats = sim.stats()
        assert stats["memory_limit_mb"] is None and stats["model"] == "qwen-plus"


# -- load generator

def test_phases_and_seeded_schedule():
    phases = parse_phases("steady=10:2,spike=20:12,20:2")
    assert phases == [Phase(10, 2, "steady"), Phase(20, 12, "spike"), Phase(20, 2, "phase3")]
    schedule = arrival_schedule(phases, seed=7)
    assert schedule == arrival_schedule(phases, seed=7) != arrival_schedule(phases, seed=8)
    spike = [t for t, name in schedule if name == "spike"]
    assert 180 < len(spike) < 300 and all(10 <= t < 30 for t in spike)
    assert len(arrival_schedule([Phase(2, 5)], arrivals="uniform")) == 10
    with pytest.raises(ValueError):
        parse_phases("10-2")


def test_load_generator_records(ideal):
    records = asyncio.run(run_load([Phase(1.0, 10, "steady")], ideal.url + "/v1", seed=1,
                                   max_tokens=6, arrivals="uniform"))
    assert [r.id for r in records] == list(range(10))
    for r in records:
        assert r.outcome == "ok" and r.status == 200 and r.phase == "steady"
        assert r.model == SERVED and r.upstream == SERVED and r.attempts is None
        assert r.chunks == 6 + 1 and 0 < r.ttft < r.end - r.start
    summary = summarize(records)
    assert summary["requests"] == summary["ok"] == 10 and summary["ttft_p50_ms"] is not None


def test_load_generator_is_open_loop(ideal):
    ideal.set_faults(first_token_delay=1.0)  # every answer takes over a second
    records = asyncio.run(run_load([Phase(1.0, 10)], ideal.url + "/v1", seed=1, max_tokens=2,
                                   arrivals="uniform"))
    assert len(records) == 10 and all(r.ok for r in records)
    assert max(r.start - r.scheduled for r in records) < 0.1
    assert records[-1].start - records[0].start == pytest.approx(0.9, abs=0.1)
    assert records[-1].start < records[0].end  # the last was sent before the first was answered
    assert all(r.ttft >= 1.0 for r in records)


def test_load_generator_cli(ideal, tmp_path):
    out = tmp_path / "records.jsonl"
    ideal.set_faults(status=429)
    result = subprocess.run(
        [sys.executable, "-m", "llmsim.loadgen", "--base-url", ideal.url + "/v1", "--phases", "0.5:10",
         "--arrivals", "uniform", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == 5 and summary["outcomes"] == {"RateLimitError:429": 5}
    assert [r.status for r in read_records(str(out))] == [429] * 5
