"""Anthropic Messages, OpenAI Responses, Ollama's native API and embeddings through llm-ha, end to end:
a real mitmdump in reverse mode, simulators speaking each API, and each API's own client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import openai
import pytest

anthropic = pytest.importorskip("anthropic", reason="the anthropic client is a test extra (pip install anthropic)")
ollama = pytest.importorskip("ollama", reason="the ollama client is a test extra (pip install ollama)")

pytestmark = pytest.mark.e2e

CLIENT_KEY = "sk-client-own-key-0001"
FALLBACK_KEY = "sk-fallback-secret-0003"
PROTOCOLS = ["anthropic", "responses", "ollama"]
ALL = "[openai, anthropic, responses, ollama]"


def profile(fallback: str, *, primary_protocols: str = ALL, fallback_auth: str = "bearer", min_requests: int = 50,
            first_byte: str = "300ms") -> str:
    return f"""
first_byte_timeout: {first_byte}
request_timeout: 10s
health_check:
  failure_rate_threshold: 50
  base_ejection_time: 30s
  min_requests: {min_requests}
upstreams:
  - name: primary
    model: primary-model-name
    protocols: {primary_protocols}
  - name: fallback
    nodes: ["{fallback}"]
    api_key: "{FALLBACK_KEY}"
    auth: {fallback_auth}
    model: qwen-plus
    first_byte_timeout: 5s
    protocols: {ALL}
"""


@dataclass
class Reply:
    text: str = ""
    model: str | None = None
    times: list[float] = field(default_factory=list)  # arrival of each content token
    upstream: str | None = None  # x-llm-ha-upstream, when the client shows headers


async def ask(protocol: str, url: str, stream: bool = True, max_tokens: int = 12) -> Reply:
    """One request in `protocol`, with that API's own client; raises as the client does on errors."""
    reply = Reply()
    if protocol == "anthropic":
        client = anthropic.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=15)
        raw = await client.messages.with_raw_response.create(
            model="claude-as-the-client-says", max_tokens=max_tokens, stream=stream,
            messages=[{"role": "user", "content": "hi"}])
        reply.upstream = raw.headers.get("x-llm-ha-upstream")
        parsed = await raw.parse()
        if not stream:
            return Reply(parsed.content[0].text, parsed.model, [], reply.upstream)
        async for event in parsed:
            if event.type == "message_start":
                reply.model = event.message.model
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                reply.text += event.delta.text
                reply.times.append(time.monotonic())
    elif protocol == "responses":
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15)
        raw = await oai.responses.with_raw_response.create(
            model="gpt-as-the-client-says", input="hi", max_output_tokens=max_tokens, stream=stream)
        reply.upstream = raw.headers.get("x-llm-ha-upstream")
        parsed = raw.parse()
        if not stream:
            return Reply(parsed.output_text, parsed.model, [], reply.upstream)
        async for event in parsed:
            if event.type == "response.created":
                reply.model = event.response.model
            elif event.type == "response.output_text.delta":
                reply.text += event.delta
                reply.times.append(time.monotonic())
    else:
        client = ollama.AsyncClient(host=url, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=15)
        options = {"num_predict": max_tokens}
        messages = [{"role": "user", "content": "hi"}]
        if not stream:
            answer = await client.chat(model="llama-as-the-client-says", messages=messages, options=options,
                                       stream=False)
            return Reply(answer.message.content, answer.model)
        async for part in await client.chat(model="llama-as-the-client-says", messages=messages, options=options,
                                            stream=True):
            reply.model = part.model
            if part.message.content:
                reply.text += part.message.content
                reply.times.append(time.monotonic())
    return reply


def run(protocol: str, url: str, **kwargs) -> Reply:
    return asyncio.run(ask(protocol, url, **kwargs))


def served_by(sim) -> int:
    return sim.stats()["completed"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_healthy_primary_streams_its_answer_token_by_token(simulators, proxies, protocol):
    primary, fallback = simulators(), simulators("--preset", "fallback")
    proxy = proxies(profile(fallback.url, first_byte="5s"), reverse=primary.url)
    reply = run(protocol, proxy.url, max_tokens=20)  # 25 ms a token: about half a second from first to last
    assert len(reply.text.split()) == 20, reply
    assert primary.stats()["last_request"]["model"] == "primary-model-name"
    assert len(reply.times) == 20, reply
    spread = reply.times[-1] - reply.times[0]
    assert spread > 0.15, f"the tokens came together within {spread:.3f}s: the stream was buffered"
    assert (served_by(primary), fallback.stats()["requests"]) == (1, 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_slow_first_token_fails_over_though_the_opening_events_came_at_once(simulators, proxies, protocol):
    primary = simulators("--no-physics", "--first-token-delay", "1.5")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(fallback.url), reverse=primary.url)
    started = time.monotonic()
    reply = run(protocol, proxy.url)
    elapsed = time.monotonic() - started
    assert reply.text and reply.model == "qwen-plus"
    assert elapsed < 1.4, f"the client waited {elapsed:.2f}s: the opening events were taken for a first token"
    primary.wait_for(lambda s: s["client_disconnects"] >= 1, timeout=5)
    assert served_by(fallback) == 1 and served_by(primary) == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_in_band_error_before_the_first_token_fails_over(simulators, proxies, protocol):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(in_band_error=True)
    proxy = proxies(profile(fallback.url), reverse=primary.url)
    reply = run(protocol, proxy.url)
    assert reply.text and reply.model == "qwen-plus" and served_by(fallback) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_and_key_are_rewritten_for_the_fallback(simulators, proxies, protocol):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(status=529 if protocol == "anthropic" else 503)
    auth = "x-api-key" if protocol == "anthropic" else "bearer"
    proxy = proxies(profile(fallback.url, fallback_auth=auth), reverse=primary.url)
    reply = run(protocol, proxy.url)
    assert reply.model == "qwen-plus"
    seen = fallback.stats()["last_request"]
    assert seen["model"] == "qwen-plus"
    if protocol == "anthropic":
        assert (seen["x-api-key"], seen["authorization"]) == (FALLBACK_KEY, None)
    else:
        assert (seen["authorization"], seen["x-api-key"]) == (f"Bearer {FALLBACK_KEY}", None)
    assert FALLBACK_KEY not in proxy.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_non_streaming_answer_is_passed_whole_and_fails_over(simulators, proxies, protocol):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(fallback.url), reverse=primary.url)
    reply = run(protocol, proxy.url, stream=False, max_tokens=5)
    assert len(reply.text.split()) == 5 and primary.stats()["last_request"]["model"] == "primary-model-name"
    primary.set_faults(status=500)
    reply = run(protocol, proxy.url, stream=False, max_tokens=5)
    assert len(reply.text.split()) == 5 and reply.model == "qwen-plus"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failing_primary_is_ejected(simulators, proxies, protocol):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(status=500)
    proxy = proxies(profile(fallback.url, min_requests=1), reverse=primary.url)
    run(protocol, proxy.url)
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=5)
    before = primary.stats()["requests"]
    reply = run(protocol, proxy.url)
    assert reply.model == "qwen-plus" and primary.stats()["requests"] == before, "an ejected node is not tried"


def test_a_protocol_no_upstream_lists_goes_to_the_primary_only(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(status=503)
    text = profile(fallback.url, primary_protocols="[openai]").replace(f"protocols: {ALL}", "protocols: [openai]")
    proxy = proxies(text, reverse=primary.url)
    with pytest.raises(anthropic.APIStatusError) as caught:
        run("anthropic", proxy.url)
    assert caught.value.status_code == 502 and "primary http_error 503" in str(caught.value)
    assert fallback.stats()["requests"] == 0, "the fallback does not speak Anthropic Messages"


def test_an_upstream_that_does_not_speak_the_protocol_is_never_tried(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    proxy = proxies(profile(fallback.url, primary_protocols="[openai]"), reverse=primary.url)
    reply = run("anthropic", proxy.url)
    assert reply.model == "qwen-plus" and primary.stats()["requests"] == 0


def test_embeddings_fail_over_on_a_5xx(simulators, proxies):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(status=502)
    proxy = proxies(profile(fallback.url), reverse=primary.url)
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15)
    raw = client.embeddings.with_raw_response.create(model="embedder", input=["a", "b"])
    assert raw.headers["x-llm-ha-upstream"] == "fallback"
    result = raw.parse()
    assert len(result.data) == 2 and result.model == "qwen-plus"


def test_an_anthropic_stream_cut_midway_is_continued_with_a_native_prefill(simulators, proxies):
    from llmsim.server import expected_answer

    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(reset_after_chunks=5)
    text = profile(fallback.url).replace("    first_byte_timeout: 5s\n", "    first_byte_timeout: 5s\n    resume: prefill\n")
    proxy = proxies(text, reverse=primary.url)

    async def whole_stream() -> tuple[str, list]:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=15)
        async with client.messages.stream(model="c", max_tokens=20,
                                          messages=[{"role": "user", "content": "tell me a story"}]) as stream:
            events = [e async for e in stream]
            return (await stream.get_final_message()).content[0].text, events

    answer, events = asyncio.run(whole_stream())
    assert answer == expected_answer({"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 20})
    assert [e.type for e in events].count("message_start") == 1 and events[-1].type == "message_stop"
    assert fallback.stats()["prefill_continuations"] == 1
    assert (proxy.node("primary")["breaks"], proxy.node("fallback")["resumes"]) == (1, 1)
    final = next(e for e in events if e.type == "message_delta")
    assert final.usage.output_tokens == 20


@pytest.mark.parametrize("protocol", ["responses", "ollama"])
def test_a_cut_responses_or_ollama_stream_is_not_continued_and_the_client_sees_the_break(
        simulators, proxies, protocol):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    primary.set_faults(reset_after_chunks=3)
    text = profile(fallback.url).replace("    first_byte_timeout: 5s\n", "    first_byte_timeout: 5s\n    resume: prefill\n")
    proxy = proxies(text, reverse=primary.url)
    if protocol == "ollama":
        with pytest.raises(ollama.ResponseError) as caught:
            run(protocol, proxy.url, max_tokens=20)
        error = str(caught.value)
    else:
        error = asyncio.run(responses_error(proxy.url))
    assert "could not be continued" in error and "prefill" in error
    assert fallback.stats()["requests"] == 0


async def responses_error(url: str) -> str:
    """The message of the `error` event a broken Responses stream ends with (the SDK yields it as an event),
    the connection then being cut."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15)
    errors = []
    with pytest.raises(openai.APIConnectionError):
        async for event in await client.responses.create(model="g", input="hi", max_output_tokens=20, stream=True):
            if event.type == "error":
                errors.append(event.message)
    assert len(errors) == 1
    return errors[0]
