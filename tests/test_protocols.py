"""Protocol recognition and following, per API: first token, in-band error, end, continuation, auth."""

from __future__ import annotations

import json

import pytest
import yaml

from llmha.core.candidates import Candidate
from llmha.core.profile import ProfileError, Upstream, parse_profile
from llmha.core.splice import PROTOCOLS, Splicer, StreamFollower, api_of, plan_resume, protocol_for
from llmha.core.types import NodeId
from llmha.proxy.gate import upstream_headers


def sse(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


ANTHROPIC_OPENING = (sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m",
                                                                               "role": "assistant", "content": []}})
                     + sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}})
                     + sse("ping", {"type": "ping"}))


def anthropic_delta(text: str) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}})


ANTHROPIC_END = (sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                 + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                         "usage": {"output_tokens": 2}})
                 + sse("message_stop", {"type": "message_stop"}))


@pytest.mark.parametrize(("path", "payload", "name", "api"), [
    ("/v1/chat/completions", {"messages": []}, "openai-chat", "openai"),
    ("/v1/completions", {"prompt": "x"}, "openai-completions", "openai"),
    ("/v1/messages", {"messages": [], "max_tokens": 5}, "anthropic", "anthropic"),
    ("/v1/responses?x=1", {"input": "hi"}, "responses", "responses"),
    ("/api/chat", {"messages": []}, "ollama", "ollama"),
    ("/api/generate", {"prompt": "x"}, "ollama", "ollama"),
    ("/v1/embeddings", {"input": "x"}, None, "openai"),
    ("/api/embed", {"input": "x"}, None, "ollama"),
    ("/v1/messages/count_tokens", {"messages": []}, None, "anthropic"),
    ("/v1/models", {}, None, None),
])
def test_the_protocol_is_recognised_by_path_and_body(path, payload, name, api):
    protocol = protocol_for(path, payload)
    assert (protocol.name if protocol else None, api_of(path, payload)) == (name, api)


def test_anthropic_opening_events_are_no_first_token_and_a_delta_is():
    follower = StreamFollower(PROTOCOLS["anthropic"])
    assert follower.feed(ANTHROPIC_OPENING) == ANTHROPIC_OPENING
    assert not follower.protocol.started(follower.answer) and follower.answer.id == "msg_1"
    follower.feed(anthropic_delta("Hel"))
    assert follower.protocol.started(follower.answer) and not follower.answer.done
    follower.feed(anthropic_delta("lo") + ANTHROPIC_END)
    answer = follower.answer
    assert (answer.content, answer.finish_reason, answer.done, answer.complete) == ("Hello", "end_turn", True, True)


def test_an_anthropic_error_event_is_held_back_from_the_client():
    follower = StreamFollower(PROTOCOLS["anthropic"])
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert follower.feed(ANTHROPIC_OPENING + error) == ANTHROPIC_OPENING
    assert follower.answer.error == {"type": "overloaded_error", "message": "Overloaded"}


def test_responses_created_is_no_first_token_failed_is_an_error_completed_the_end():
    protocol = PROTOCOLS["responses"]
    follower = StreamFollower(protocol)
    follower.feed(sse("response.created", {"type": "response.created", "response": {"id": "r", "model": "m"}})
                  + sse("response.in_progress", {"type": "response.in_progress", "response": {}}))
    assert not protocol.started(follower.answer)
    follower.feed(sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}))
    assert protocol.started(follower.answer)
    follower.feed(sse("response.completed", {"type": "response.completed",
                                             "response": {"status": "completed", "usage": {"output_tokens": 1}}}))
    assert follower.answer.done and follower.answer.content == "Hi"
    failed = StreamFollower(protocol)
    failed.feed(sse("response.failed", {"type": "response.failed", "response": {"error": {"code": "server_error"}}}))
    assert failed.answer.error == {"code": "server_error"}
    assert plan_resume(protocol, follower.answer, {}).reason.startswith("the Responses API has no assistant prefill")


def test_ollama_lines_are_events_and_a_partial_line_waits():
    protocol = PROTOCOLS["ollama"]
    follower = StreamFollower(protocol)
    first = b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}\n'
    assert follower.feed(first[:20]) == b"" and not protocol.started(follower.answer)
    assert follower.feed(first[20:]) == first and protocol.started(follower.answer)
    end = b'{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop"}\n'
    follower.feed(end)
    assert follower.answer.done and follower.answer.finish_reason == "stop"
    errored = StreamFollower(protocol)
    assert errored.feed(b'{"error":"model is loading"}\n') == b""
    assert errored.answer.error == {"message": "model is loading"}
    assert protocol.streams({}) and not protocol.streams({"stream": False})


def test_an_anthropic_answer_is_continued_with_a_native_prefill_and_spliced():
    protocol = PROTOCOLS["anthropic"]
    follower = StreamFollower(protocol)
    follower.feed(ANTHROPIC_OPENING + anthropic_delta("Hel") + anthropic_delta("lo"))
    payload = {"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    assert plan_resume(protocol, follower.answer, payload).possible
    body = protocol.continuation_body(payload, follower.answer, "prefill")
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"} and body["max_tokens"] == 8
    splicer = Splicer(protocol, follower.answer)
    out = splicer.feed(ANTHROPIC_OPENING + anthropic_delta(" world") + ANTHROPIC_END)
    assert b"message_start" not in out and b"ping" not in out and b"content_block_start" not in out
    assert out.startswith(b"event: content_block_delta\ndata: ") and b'"output_tokens":4' in out
    follower.feed(out)
    assert follower.answer.content == "Hello world" and follower.answer.done


def test_an_anthropic_partial_answer_ending_in_whitespace_is_not_continued():
    follower = StreamFollower(PROTOCOLS["anthropic"])
    follower.feed(ANTHROPIC_OPENING + anthropic_delta("Hello "))
    assert "whitespace" in plan_resume(follower.protocol, follower.answer, {}).reason


@pytest.mark.parametrize(("auth", "header"), [("bearer", ("authorization", "Bearer k1")),
                                              ("x-api-key", ("x-api-key", "k1")), ("api-key", ("api-key", "k1"))])
def test_an_upstreams_key_is_sent_as_its_auth_says_and_the_clients_never(auth, header):
    upstream = Upstream("fallback", ("http://127.0.0.1:1",), api_key="k1", auth=auth)
    candidate = Candidate(upstream, NodeId("fallback", "http://127.0.0.1:1"), is_primary=True)
    client = [("x-api-key", "client"), ("authorization", "Bearer client"), ("anthropic-version", "2023-06-01")]
    headers = upstream_headers(client, candidate)
    assert header in headers and ("anthropic-version", "2023-06-01") in headers
    assert not any(v in ("client", "Bearer client") for _, v in headers)


def parse_profile_text(text: str, path: str):
    return parse_profile(yaml.safe_load(text), path, {}, None)


def profile_with(extra: str) -> str:
    return f"upstreams:\n  - name: p\n    nodes: [\"http://127.0.0.1:1\"]\n{extra}"


def test_auth_and_protocols_are_read_and_default_to_bearer_and_openai():
    default = parse_profile_text(profile_with(""), "p.yaml").upstreams[0]
    assert (default.auth, default.protocols) == ("bearer", ("openai",))
    given = parse_profile_text(profile_with("    auth: x-api-key\n    protocols: [anthropic, openai]\n"), "p.yaml")
    assert (given.upstreams[0].auth, given.upstreams[0].protocols) == ("x-api-key", ("anthropic", "openai"))


@pytest.mark.parametrize(("extra", "message"), [
    ("    auth: token\n", "upstreams[0].auth: needs one of bearer, x-api-key, api-key, got 'token'"),
    ("    protocols: [grpc]\n", "upstreams[0].protocols: needs a list of openai, anthropic, responses, ollama"),
    ("    protocols: anthropic\n", "upstreams[0].protocols: needs a list of"),
])
def test_bad_auth_or_protocols_stop_with_one_line(extra, message):
    with pytest.raises(ProfileError) as caught:
        parse_profile_text(profile_with(extra), "p.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("path", "body", "content_type"), [
    ("/v1/messages", {"model": "c", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
     "text/event-stream"),
    ("/v1/responses", {"model": "g", "input": "hi", "stream": True}, "text/event-stream"),
    ("/api/chat", {"model": "l", "messages": [{"role": "user", "content": "hi"}]}, "application/x-ndjson"),
])
def test_the_llm_stream_view_assembles_anthropic_responses_and_ollama_streams(path, body, content_type):
    from mitmproxy import contentviews
    from mitmproxy.test import taddons, tflow, tutils

    from llmha.contentview import llm_stream_view, remove_view
    from llmsim.wires import wire_for

    wire, _ = wire_for(path, "sim-model", body)
    stream = wire.preamble(4) + wire.token("Hel") + wire.token("lo") + wire.end("stop", 4, 2)
    flow = tflow.tflow(req=tutils.treq(method=b"POST", path=path.encode(), content=json.dumps(body).encode()),
                       resp=tutils.tresp(content=stream))
    flow.response.headers["content-type"] = content_type
    contentviews.add(llm_stream_view)
    try:
        with taddons.context():
            result = contentviews.prettify_message(flow.response, flow)
    finally:
        remove_view()
    assert result.view_name == "LLM stream"
    assert "--- content ---\nHello\n" in result.text and "sim-model" in result.text
    assert "ended early" not in result.text


def test_the_simulator_answers_errors_in_each_apis_form():
    import httpx

    from llmsim.control import start_simulator

    sim = start_simulator("--no-physics")
    try:
        sim.set_faults(status=529)
        body = {"model": "c", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        anthropic_error = httpx.post(f"{sim.url}/v1/messages", json=body, timeout=5)
        assert anthropic_error.status_code == 529
        assert anthropic_error.json() == {"type": "error", "error": {"type": "overloaded_error",
                                                                     "message": "simulated status 529"}}
        sim.set_faults(status=500)
        assert httpx.post(f"{sim.url}/api/chat", json=body, timeout=5).json() == {"error": "simulated status 500"}
        sim.clear_faults()
        refused = httpx.post(f"{sim.url}/v1/messages", json={"model": "c", "messages": []}, timeout=5)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    finally:
        sim.stop()
