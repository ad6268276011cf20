"""The simulated LLM servers (llmsim.server) and the load generator (llmsim.loadgen), as real processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llmsim.control import SimulatorError, start_simulator
from llmsim.loadgen import Phase, arrival_schedule, parse_phases, read_records, run_load, summarize
from llmsim.server import expected_answer, expected_generation

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
    tokens = [expected_generation(body).token(i) for i in range(5)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": tokens[0]}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:5]] == tokens
    assert "".join(tokens) == expected_answer(body) and not tokens[0].startswith(" ")
    assert chunks[5]["choices"][0]["finish_reason"] == "length"
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 5
    last = ideal.stats()["last_request"]
    assert last == {"method": "POST", "path": CHAT, "model": "asked-model", "authorization": "Bearer sk-test",
                    "x-api-key": None}


def test_non_streaming_answer_and_models(ideal):
    client = openai.OpenAI(base_url=ideal.url + "/v1", api_key="k", max_retries=0)
    answers = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4) for _ in range(2)]
    assert answers[0].model == SERVED
    assert answers[0].choices[0].message.content == expected_answer(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
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
    with pytest.raises(SimulatorError, match="no_done"):
        ideal.set_faults(no_done="yes")
    with pytest.raises(SimulatorError, match="prefill must be one of any, vllm, deepseek, reject"):
        ideal.set_faults(prefill="sometimes")


# -- deterministic answers and continuing a partial answer (prefill)

QUESTION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is an SSE stream?"}]


def openai_client(sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="k", max_retries=0)


def stream_chat(client: openai.OpenAI, messages: list, **kwargs) -> tuple[list, str]:
    """(the chunks, the text) of one streamed chat completion."""
    chunks = list(client.chat.completions.create(model="x", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def prefill_request(form: str, partial: str) -> tuple[list, dict]:
    """(messages, extra body) asking to continue `partial` in one of the three forms."""
    message = {"role": "assistant", "content": partial}
    extra = {}
    if form == "vllm":
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    elif form == "deepseek":
        message["prefix"] = True
    return [*QUESTION, message], extra


def test_the_answer_is_a_function_of_the_request_alone(ideal, simulators):
    fallback = simulators("--preset", "fallback")
    body = {"messages": QUESTION, "max_tokens": 12}
    expected = expected_answer(body)
    answers = [stream_chat(openai_client(sim), QUESTION, max_tokens=12)[1] for sim in (ideal, fallback, ideal)]
    assert answers == [expected] * 3
    other = stream_chat(openai_client(ideal), [{"role": "user", "content": "something else"}], max_tokens=12)[1]
    assert other != expected and len(expected.split()) == 12


@pytest.mark.parametrize("form", ["plain", "vllm", "deepseek"])
def test_a_prefill_is_continued_exactly(ideal, form):
    client = openai_client(ideal)
    whole_chunks, whole = stream_chat(client, QUESTION, max_tokens=10)
    tokens = [c.choices[0].delta.content for c in whole_chunks if c.choices and c.choices[0].delta.content]
    before = ideal.stats()["prefill_continuations"]
    for produced in (0, 4, 9):
        partial = "".join(tokens[:produced])
        messages, extra = prefill_request(form, partial)
        chunks, rest = stream_chat(client, messages, max_tokens=10 - produced, extra_body=extra)
        assert partial + rest == whole, produced
        assert chunks[0].choices[0].delta.role == "assistant"
        assert rest == expected_answer({"messages": messages, "max_tokens": 10 - produced})
        usage = chunks[-1].usage  # the prefill's tokens are prompt tokens
        assert usage.completion_tokens == 10 - produced
        assert usage.prompt_tokens - produced == whole_chunks[-1].usage.prompt_tokens
    assert ideal.stats()["prefill_continuations"] == before + 3


def test_a_continuation_without_max_tokens_ends_the_natural_answer(ideal):
    client = openai_client(ideal)
    whole = client.chat.completions.create(model="x", messages=QUESTION).choices[0]
    assert whole.finish_reason == "stop" and len(whole.message.content.split()) == 32  # --default-max-tokens
    partial = " ".join(whole.message.content.split()[:20])
    rest = client.chat.completions.create(model="x", messages=prefill_request("plain", partial)[0]).choices[0]
    assert partial + rest.message.content == whole.message.content and rest.finish_reason == "stop"


def test_a_prefill_that_is_not_the_answer_is_answered_afresh(ideal):
    before = ideal.stats()["prefill_mismatches"]
    messages, _ = prefill_request("plain", "not what the model said")
    _, text = stream_chat(openai_client(ideal), messages, max_tokens=6)
    assert text == expected_answer({"messages": QUESTION, "max_tokens": 6})
    assert ideal.stats()["prefill_mismatches"] == before + 1
    assert "not the beginning of this conversation's answer" in ideal.stderr()


def test_prefill_reject_mode(ideal):
    ideal.set_faults(prefill="reject")
    client = openai_client(ideal)
    for form in ("plain", "vllm", "deepseek"):
        messages, extra = prefill_request(form, "")
        with pytest.raises(openai.BadRequestError) as caught:
            stream_chat(client, messages, max_tokens=4, extra_body=extra)
        assert caught.value.status_code == 400
        assert caught.value.body["code"] == "prefill_unsupported"
        assert caught.value.body["type"] == "invalid_request_error"
    assert stream_chat(client, QUESTION, max_tokens=4)[1] == expected_answer({"messages": QUESTION, "max_tokens": 4})
    assert ideal.stats()["prefill_refused"] >= 3


@pytest.mark.parametrize("mode", ["vllm", "deepseek"])
def test_a_prefill_mode_accepts_only_its_own_form(ideal, mode):
    ideal.set_faults(prefill=mode)
    client = openai_client(ideal)
    whole = expected_answer({"messages": QUESTION, "max_tokens": 8})
    partial = " ".join(whole.split()[:3])
    for form in ("plain", "vllm", "deepseek"):
        messages, extra = prefill_request(form, partial)
        if form == mode:
            assert partial + stream_chat(client, messages, max_tokens=5, extra_body=extra)[1] == whole
            continue
        with pytest.raises(openai.BadRequestError) as caught:
            stream_chat(client, messages, max_tokens=5, extra_body=extra)
        if mode == "vllm":  # vLLM's error: type BadRequestError, code 400
            assert caught.value.body["type"] == "BadRequestError" and caught.value.body["code"] == 400
            assert "continue_final_message" in caught.value.body["message"]
        else:
            assert caught.value.body["code"] == "prefill_unsupported"
    if mode == "vllm":  # add_generation_prompt defaults to true, as in vLLM
        with pytest.raises(openai.BadRequestError, match="Cannot set both"):
            stream_chat(client, prefill_request("plain", partial)[0], extra_body={"continue_final_message": True})


# -- stalls and streams that end without [DONE], read raw with timestamps

def timed_lines(url: str, body: dict, timeout: float = 10) -> list[tuple[float, str]]:
    """(seconds since the request, line) of every non-empty line of a streamed answer."""
    start = time.monotonic()
    with httpx.stream("POST", url + CHAT, json=body, timeout=timeout) as response:
        assert response.status_code == 200
        return [(time.monotonic() - start, line) for line in response.iter_lines() if line]


def test_stall_after_chunks_fault(ideal):
    ideal.set_faults(stall_after_chunks=3, stall_seconds=0.6)
    before = ideal.stats()["stalls"]
    body = chat_body(6)
    lines = timed_lines(ideal.url, body)
    data = [(t, line[len("data: "):]) for t, line in lines if line.startswith("data: ")]
    assert len(data) == len(lines) == 6 + 2 and data[-1][1] == "[DONE]"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(data)]
    assert gaps[2] >= 0.58 and max(gaps[:2] + gaps[3:]) < 0.2, gaps
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for _, d in data[:-1])
    assert text == expected_answer(body)
    assert ideal.stats()["stalls"] == before + 1


def test_stall_with_keepalive_comments_time_scaled(simulators):
    # Time scale 0.2: a 2.5 s stall takes 0.5 s, with a keep-alive comment every 0.2 s.
    sim = simulators("--no-physics", "--time-scale", "0.2", "--stall-after-chunks", "2", "--stall-seconds", "2.5",
                     "--stall-keepalive")
    lines = timed_lines(sim.url, chat_body(4))
    kinds = ["comment" if line.startswith(":") else "data" for _, line in lines]
    assert kinds == ["data"] * 2 + ["comment"] * 2 + ["data"] * (2 + 2)
    assert {line for _, line in lines if line.startswith(":")} == {": keep-alive"}
    times = [t for t, _ in lines]
    assert 0.15 < times[2] - times[1] < 0.3 and 0.15 < times[3] - times[2] < 0.3
    assert times[4] - times[1] >= 0.48
    assert sim.stats()["stalls"] == 1


def test_no_done_ends_the_stream_after_the_last_content_event(ideal):
    ideal.set_faults(no_done=True)
    body = chat_body(5, stream_options={"include_usage": True})
    events = sse_data(httpx.post(ideal.url + CHAT, json=body).text)  # a clean end: no transport error
    chunks = [json.loads(e) for e in events]
    assert len(chunks) == 5 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected_answer(body)
    assert ideal.stats()["ended_without_done"] >= 1


def test_no_done_after_n_events_and_the_prefill_continues_it(ideal):
    ideal.set_faults(no_done=3)
    client = openai_client(ideal)
    _, partial = stream_chat(client, QUESTION, max_tokens=8)  # the openai client sees a short answer, no error
    whole = expected_answer({"messages": QUESTION, "max_tokens": 8})
    assert whole.startswith(partial) and len(partial.split()) == 3
    ideal.set_faults(no_done=False)
    _, rest = stream_chat(client, prefill_request("plain", partial)[0], max_tokens=5)
    assert partial + rest == whole


# -- legacy completions

PROMPT = "Once upon a time"


def test_completions_stream_and_continuation(ideal):
    client = openai_client(ideal)
    chunks = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=7, stream=True))
    whole = "".join(c.choices[0].text for c in chunks)
    assert whole == expected_answer({"prompt": PROMPT, "max_tokens": 7}) and len(whole.split()) == 7
    assert all(c.object == "text_completion" and c.model == SERVED for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 7 + ["length"]
    raw = json.loads(sse_data(httpx.post(ideal.url + "/v1/completions",
                                         json={"prompt": PROMPT, "max_tokens": 2, "stream": True}).text)[0])
    assert set(raw) == {"id", "object", "created", "model", "choices"}
    assert set(raw["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}

    before = ideal.stats()["prefill_continuations"]
    first = client.completions.create(model="x", prompt=PROMPT, max_tokens=7)
    for produced in (1, 3, 6):
        partial = "".join(c.choices[0].text for c in chunks[:produced])
        rest = client.completions.create(model="x", prompt=PROMPT + partial, max_tokens=7 - produced)
        assert partial + rest.choices[0].text == whole
        assert rest.usage.completion_tokens == 7 - produced
        assert rest.usage.prompt_tokens - produced == first.usage.prompt_tokens
    assert ideal.stats()["prefill_continuations"] == before + 3
    assert first.choices[0].text == whole and first.object == "text_completion"


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
