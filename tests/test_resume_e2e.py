"""After the first token: a stalled or broken stream is continued on another node, and the client sees
one uninterrupted stream (or, where that would be unsafe, a well-formed in-band error and the break)."""

import asyncio
import time

import openai
import pytest

from llmsim.server import expected_answer
from support.scripted import ScriptedUpstream, chat_chunk

pytestmark = pytest.mark.e2e

BODY = {"model": "m", "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 60}


def profile(primary: str, fallback: str, resume: str = "prefill", idle: str = "20s") -> str:
    return f"""
first_byte_timeout: 2s
stream_idle_timeout: {idle}
health_check: {{min_requests: 50}}
upstreams:
  - name: primary
    nodes: ["{primary}"]
  - name: fallback
    nodes: ["{fallback}"]
    resume: {resume}
"""


async def stream(url: str, body: dict = BODY, usage: bool = False) -> tuple[str, list, dict]:
    """The assembled content, every chunk, and the response headers; raises on a broken stream."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    try:
        async with client.chat.completions.with_streaming_response.create(stream=True, **body, **extra) as response:
            chunks = [c async for c in await response.parse()]
            headers = dict(response.headers)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks, headers
    finally:
        await client.close()


def test_a_cut_stream_is_resumed_on_the_fallback_and_the_client_gets_the_whole_answer(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
    primary.set_faults(reset_after_chunks=40)
    content, chunks, headers = asyncio.run(stream(proxy.url, usage=True))
    assert content == expected_answer(BODY), "the continuation carries on exactly where the cut was"
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {chunks[0].model}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1, "one role delta"
    assert chunks[-1].usage.completion_tokens == 60
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert fallback.stats()["prefill_continuations"] == 1
    primary_node, fallback_node = proxy.node("primary"), proxy.node("fallback")
    assert (primary_node["breaks"], fallback_node["resumes"]) == (1, 1)
    resumes = [e for e in proxy.status()["events"] if e["action"] == "resume"]
    assert [(e["upstream"], e["to_upstream"], e["reason"]) for e in resumes] == [("primary", "fallback", "stream_cut")]


def test_a_stall_is_detected_after_stream_idle_timeout_and_the_answer_completed(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, idle="2s"), reverse=primary.url)
    primary.set_faults(stall_after_chunks=20, stall_seconds=60, stall_keepalive=True)
    started = time.monotonic()
    content, _, _ = asyncio.run(stream(proxy.url))
    took = time.monotonic() - started
    assert content == expected_answer(BODY)
    assert 2.0 <= took < 2.0 + 3.0, "keep-alive comments are no progress: the stall is judged after 2 s"
    node = proxy.node("primary")
    assert (node["stalls"], node["breaks"]) == (1, 1)


def test_a_stream_that_ends_without_done_is_a_break_and_is_resumed(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
    primary.set_faults(no_done=30)
    content, _, _ = asyncio.run(stream(proxy.url))
    assert content == expected_answer(BODY)
    assert [e["reason"] for e in proxy.status()["events"] if e["action"] == "resume"] == ["truncated"]


def test_a_fallback_that_rejects_prefill_leaves_a_broken_stream_naming_the_cut(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
    primary.set_faults(reset_after_chunks=40)
    fallback.set_faults(prefill="reject")
    with pytest.raises(openai.APIError) as caught:
        asyncio.run(stream(proxy.url))
    assert "stream_cut" in str(caught.value) and "primary" in str(caught.value)
    assert fallback.stats()["prefill_refused"] == 1


def test_the_resume_off_default_passes_the_break_on_and_asks_nobody(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url, resume="off"), reverse=primary.url)
    primary.set_faults(reset_after_chunks=40)
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        asyncio.run(stream(proxy.url))
    assert fallback.stats()["requests"] == 0


def test_a_tool_call_cut_mid_arguments_is_not_continued(simulators, proxies):
    fallback = simulators("--preset", "fallback")
    events = [chat_chunk({"role": "assistant", "content": None,
                          "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}]}),
              chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]})]
    with ScriptedUpstream(events, then="reset") as primary:
        proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
        with pytest.raises(openai.APIError) as caught:
            asyncio.run(stream(proxy.url))
    assert "tool call" in str(caught.value)
    assert fallback.stats()["requests"] == 0


def test_a_finished_answer_whose_done_is_lost_ends_cleanly(simulators, proxies):
    fallback = simulators("--preset", "fallback")
    events = [chat_chunk({"role": "assistant", "content": "Hello"}), chat_chunk({"content": " world"}),
              chat_chunk({}, "stop")]
    with ScriptedUpstream(events, then="reset") as primary:
        proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
        content, _, _ = asyncio.run(stream(proxy.url))
    assert content == "Hello world" and fallback.stats()["requests"] == 0
