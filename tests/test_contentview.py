"""The "LLM stream" content view, on flows from the sample recording and on hand-made answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import contentviews, io
from mitmproxy.contentviews import Metadata
from mitmproxy.http import Headers
from mitmproxy.test import taddons, tflow, tutils

from llmha.contentview import JSON_PRIORITY, SSE_PRIORITY, assemble_stream, llm_stream_view, remove_view

SAMPLE = Path(__file__).resolve().parent / "data" / "sample-recording.flows"


@pytest.fixture(scope="module")
def flows() -> list:
    with open(SAMPLE, "rb") as f:
        return list(io.FlowReader(f).stream())


@pytest.fixture
def registered():
    """The view registered as the addon does it, and mitmproxy's options for prettify_message."""
    contentviews.add(llm_stream_view)
    with taddons.context():
        yield
    remove_view()


def shown(flow) -> contentviews.ContentviewResult:
    return contentviews.prettify_message(flow.response, flow)


def data_events(body: bytes) -> list[dict]:
    """The JSON events of an SSE body, parsed here independently of llmha.sse."""
    events = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def expected_text(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


def attempts_of(flow) -> list[dict]:
    return flow.metadata["llm_ha"]["attempts"]


def test_a_recorded_stream_is_shown_assembled_by_default(registered, flows):
    flow = next(f for f in flows if f.metadata["llm_ha"]["streamed"] and len(attempts_of(f)) == 1
                and attempts_of(f)[0]["outcome"] == "ok")
    events = data_events(flow.response.content)
    result = shown(flow)

    assert result.view_name == "LLM stream"
    text = result.text
    content = text.split("--- content ---\n", 1)[1].rstrip("\n")
    assert content == expected_text(events) and content.startswith("lorem ipsum")
    winner = attempts_of(flow)[0]
    waited = winner["start"] + winner["ttfb_s"] - flow.request.timestamp_start
    assert f"model:         {events[0]['model']}" in text
    assert "finish reason: length" in text
    assert f"chunks:        {len(events)}\n" in text
    assert (f"first chunk:   {waited * 1000:.0f} ms for the client; primary {winner['node']} took "
            f"{winner['ttfb_s'] * 1000:.0f} ms (attempt 1 of 1)\n") in text
    assert f"llm-ha:        {flow.comment}" in text


def test_a_failed_over_stream_shows_the_attempts_as_a_table_and_both_waits(registered, flows):
    flow = next(f for f in flows if len(attempts_of(f)) == 2 and attempts_of(f)[1]["upstream"] == "fallback")
    late, answer = attempts_of(flow)
    text = shown(flow).text
    assert "model:         qwen-plus" in text
    assert f"llm-ha:        {flow.comment}" in text
    waited = answer["start"] + answer["ttfb_s"] - flow.request.timestamp_start
    assert waited > late["timeout_s"] > answer["ttfb_s"], "the client waited for the primary's timeout too"
    assert (f"first chunk:   {waited * 1000:.0f} ms for the client; fallback {answer['node']} took "
            f"{answer['ttfb_s'] * 1000:.0f} ms (attempt 2 of 2)\n") in text
    table = text.split("attempts:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [row.split() for row in table] == [
        ["#", "upstream", "node", "outcome", "status", "TTFB", "ms", "duration", "ms"],
        ["1", "primary", late["node"], "timeout", "-", "-", f"{late['duration_s'] * 1000:.0f}"],
        ["2", "fallback", answer["node"], "ok", "200", f"{answer['ttfb_s'] * 1000:.0f}",
         f"{answer['duration_s'] * 1000:.0f}"]]


def test_a_resumed_stream_times_its_first_chunk_on_the_attempt_that_sent_it(registered):
    flow = sse_flow(sse(chunk({"content": "Hel"}), chunk({"content": "lo"}, finish="stop")))
    flow.request.timestamp_start = 100.0
    flow.metadata["llm_ha"] = {"upstream": "fallback", "summary": "...", "attempts": [
        {"upstream": "primary", "node": "http://p", "start": 100.01, "outcome": "stream_cut", "status": 200,
         "ttfb_s": 0.05, "duration_s": 0.4, "events": 41},
        {"upstream": "fallback", "node": "http://f", "start": 100.41, "outcome": "ok", "status": 200,
         "ttfb_s": 0.09, "duration_s": 0.3, "resumed": True}]}
    text = shown(flow).text
    assert "first chunk:   60 ms for the client; primary http://p took 50 ms (attempt 1 of 2)\n" in text
    assert "stream_cut after 41 events" in text and "ok (resumed)" in text


def test_usage_is_shown_when_the_stream_carries_it(registered, flows):
    flow = next(f for f in flows if b'"usage":{"prompt_tokens"' in (f.response.content or b"").replace(b" ", b""))
    usage = next(e["usage"] for e in data_events(flow.response.content) if e.get("usage"))
    assert (f"usage:         prompt {usage['prompt_tokens']}, completion {usage['completion_tokens']}, "
            f"total {usage['total_tokens']}") in shown(flow).text


def test_a_plain_chat_completion_answer_is_shown_too(registered, flows):
    flow = next(f for f in flows if not f.metadata["llm_ha"]["streamed"])
    answer = json.loads(flow.response.content)
    result = shown(flow)
    assert result.view_name == "LLM stream"
    assert result.text.endswith(f"--- content ---\n{answer['choices'][0]['message']['content']}\n")
    assert "chunks:" not in result.text and "first byte:" in result.text


def sse_flow(body: bytes, with_timestamps: bool = True):
    request = tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=b'{"stream": true}')
    response = tutils.tresp(content=body, headers=Headers(((b"content-type", b"text/event-stream"),)))
    flow = tflow.tflow(req=request, resp=response)
    if with_timestamps:
        flow.request.timestamp_start, flow.response.timestamp_start = 1000.0, 1000.125
    return flow


def sse(*events: dict, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict, finish=None) -> dict:
    return {"object": "chat.completion.chunk", "model": "deepseek-r1",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_reasoning_content_is_assembled_apart_and_timing_approximated_without_llm_ha(registered):
    body = sse(chunk({"role": "assistant", "reasoning_content": "The user "}), chunk({"reasoning_content": "greets."}),
               chunk({"content": "Hello"}), chunk({"content": "!"}, finish="stop"))
    text = shown(sse_flow(body)).text
    assert "--- reasoning ---\nThe user greets.\n\n--- content ---\nHello!\n" in text
    assert "finish reason: stop" in text and "chunks:        4\n" in text
    assert "first chunk:   125 ms (approximated: request start to response headers)" in text
    assert "llm-ha:" not in text


def test_errors_and_cut_streams_are_named():
    completion = assemble_stream(sse(chunk({"content": "Hel"}), {"error": {"message": "overloaded"}}, done=False))
    assert completion.errors == ["overloaded"] and not completion.done
    text = llm_stream_view.prettify(sse(chunk({"content": "Hel"}), done=False),
                                    Metadata(flow=sse_flow(b""), content_type="text/event-stream"))
    assert "chunks:        1 (no [DONE]: the stream ended early)" in text


def test_priority_high_for_chat_streams_only(flows):
    stream_flow = next(f for f in flows if f.metadata["llm_ha"]["streamed"])
    plain_flow = next(f for f in flows if not f.metadata["llm_ha"]["streamed"])

    def priority(flow, message, content_type):
        meta = Metadata(flow=flow, http_message=message, content_type=content_type)
        return llm_stream_view.render_priority(message.content, meta)

    assert priority(stream_flow, stream_flow.response, "text/event-stream") == SSE_PRIORITY
    assert priority(plain_flow, plain_flow.response, "application/json") == JSON_PRIORITY
    assert priority(stream_flow, stream_flow.request, "application/json") < 0
    other = tflow.tflow(resp=tutils.tresp(content=b'{"object": "list"}'))
    assert priority(other, other.response, "application/json") < 0
    assert priority(other, other.response, "text/html") < 0


def test_the_view_can_be_removed_again(flows):
    contentviews.add(llm_stream_view)
    assert "llm stream" in contentviews.registry
    remove_view()
    assert "llm stream" not in contentviews.registry
    with taddons.context():
        assert shown(flows[0]).view_name != "LLM stream"


def test_the_comment_leads_with_who_answered():
    from llmha.addons.flowgate import summarize

    def attempt(upstream, outcome, **more):
        return {"upstream": upstream, "node": f"http://{upstream}", "start": 0.0, "outcome": outcome, **more}

    late = attempt("primary", "timeout", timeout_s=0.2)
    assert summarize([attempt("primary", "ok", status=200, ttfb_s=0.083)]) == "primary 83ms"
    assert summarize([late, attempt("fallback", "ok", status=200, ttfb_s=0.083)]) == "fallback 83ms ← primary timeout 200ms"
    assert summarize([late, attempt("fallback", "http_error", status=500)]) == \
        "none ← fallback http_error 500 ← primary timeout 200ms"
    assert summarize([attempt("primary", "client_error", status=400)]) == "primary client_error 400"
    assert summarize([]) == "none ← no upstream node to try"
    broken = attempt("primary", "stream_cut", status=200, ttfb_s=0.08, events=41)
    resumed = attempt("fallback", "ok", status=200, ttfb_s=0.095, resumed=True)
    assert summarize([broken, resumed]) == "fallback resumed 95ms ← primary ok 80ms, stream_cut after 41 events"
