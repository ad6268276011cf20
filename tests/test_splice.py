"""Following a stream as the client receives it, and splicing a continuation into it (pure)."""

import json

from llmha.core.splice import PROTOCOLS, Splicer, StreamFollower, plan_resume, protocol_for

CHAT = PROTOCOLS["openai-chat"]


def event(delta: dict, finish=None, **extra) -> bytes:
    body = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 7, "model": "primary-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_only_whole_events_pass_and_the_answer_is_followed():
    follower = StreamFollower(CHAT)
    wire = event({"role": "assistant", "content": "Hel"}) + event({"content": "lo"})
    assert follower.feed(wire[:10]) == b"" and not follower.progressed
    assert follower.feed(wire[10:-3]) == event({"role": "assistant", "content": "Hel"})
    assert follower.feed(wire[-3:]) == event({"content": "lo"}) and follower.progressed
    assert follower.feed(b": keep-alive\n\n") == b": keep-alive\n\n" and not follower.progressed
    a = follower.answer
    assert (a.content, a.id, a.model, a.role_sent, a.content_events, a.done) == ("Hello", "chatcmpl-a",
                                                                                  "primary-model", True, 2, False)
    follower.feed(event({}, "stop") + b"data: [DONE]\n\n")
    assert follower.answer.done and follower.answer.finish_reason == "stop" and follower.answer.complete


def test_an_in_band_error_is_held_back_with_everything_after_it():
    follower = StreamFollower(CHAT)
    wire = event({"content": "a"}) + b'data: {"error": {"message": "overloaded"}}\n\n' + event({"content": "b"})
    assert follower.feed(wire) == event({"content": "a"})
    assert follower.answer.error == {"message": "overloaded"} and follower.answer.content == "a"


def test_continuation_bodies_in_each_form_with_fewer_tokens():
    follower = StreamFollower(CHAT)
    follower.feed(event({"role": "assistant", "content": "one"}) + event({"content": " two"}))
    payload = {"model": "m", "messages": [{"role": "user", "content": "count"}], "max_tokens": 10, "stream": True}
    plain = CHAT.continuation_body(payload, follower.answer, "prefill")
    assert plain["messages"][-1] == {"role": "assistant", "content": "one two"} and plain["max_tokens"] == 8
    assert payload["max_tokens"] == 10 and len(payload["messages"]) == 1, "the client's request is left alone"
    vllm = CHAT.continuation_body(payload, follower.answer, "prefill-vllm")
    assert (vllm["continue_final_message"], vllm["add_generation_prompt"]) == (True, False)
    assert CHAT.continuation_body(payload, follower.answer, "prefill-deepseek")["messages"][-1]["prefix"] is True
    completions = PROTOCOLS["openai-completions"]
    text = StreamFollower(completions)
    text.feed(b'data: {"id": "c", "choices": [{"index": 0, "text": " more"}]}\n\n')
    assert completions.continuation_body({"prompt": "Say", "max_tokens": 3}, text.answer, "prefill") == \
        {"prompt": "Say more", "max_tokens": 2}


def test_unsafe_answers_are_not_resumed():
    def follower_after(*events: bytes):
        f = StreamFollower(CHAT)
        for e in events:
            f.feed(e)
        return f.answer

    base = {"messages": []}
    tool = follower_after(event({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}))
    assert plan_resume(CHAT, tool, base).reason == "a tool call was half-sent"
    thinking = follower_after(event({"reasoning_content": "hmm"}))
    assert "reasoning" in plan_resume(CHAT, thinking, base).reason
    fine = follower_after(event({"content": "x"}))
    assert plan_resume(CHAT, fine, {**base, "n": 2}).reason == "the request asked for n > 1 choices"
    assert plan_resume(CHAT, fine, {**base, "logprobs": True}).reason == "the request asked for logprobs"
    assert plan_resume(CHAT, fine, base).possible


def test_the_splicer_makes_the_continuation_part_of_the_clients_stream():
    follower = StreamFollower(CHAT)
    follower.feed(event({"role": "assistant", "content": "one"}) + event({"content": " two"}))
    splicer = Splicer(CHAT, follower.answer)
    continuation = (b"data: " + json.dumps({"id": "other", "created": 9, "model": "fallback-model", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}).encode() + b"\n\n"
        + b"data: " + json.dumps({"id": "other", "created": 9, "model": "fallback-model", "choices": [
            {"index": 0, "delta": {"content": " three"}, "finish_reason": "length"}]}).encode() + b"\n\n"
        + b"data: " + json.dumps({"id": "other", "created": 9, "model": "fallback-model", "choices": [],
                                  "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}).encode()
        + b"\n\ndata: [DONE]\n\n")
    out = splicer.feed(continuation[:50]) + splicer.feed(continuation[50:])
    events = [json.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    assert len(events) == 2, "the continuation's opening role delta is dropped"
    assert {(e["id"], e["created"], e["model"]) for e in events} == {("chatcmpl-a", 7, "primary-model")}
    assert events[0]["choices"][0]["delta"] == {"content": " three"}
    assert events[1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert out.endswith(b"data: [DONE]\n\n")


def test_protocols_are_recognised_by_path_and_body():
    assert protocol_for("/v1/chat/completions", {"messages": []}) is CHAT
    assert protocol_for("/v1/completions?x=1", {"prompt": "p"}) is PROTOCOLS["openai-completions"]
    assert protocol_for("/v1/embeddings", {"input": "x"}) is None
    assert protocol_for("/v1/chat/completions", {}) is None


class CountingChat(type(CHAT)):
    """The chat protocol, counting the events it parses."""

    parsed = 0

    def follow(self, answer, data):
        self.parsed += 1
        super().follow(answer, data)


def test_a_lazy_follower_knows_a_well_ended_stream_is_done_without_parsing_its_events():
    protocol = CountingChat()
    follower = StreamFollower(protocol, lazy=True)
    wire = event({"role": "assistant", "content": "Hel"}) + event({"content": "lo"}) + event({}, "stop")
    assert follower.feed(wire + b"data: [DONE]\n\n") == wire + b"data: [DONE]\n\n"
    assert follower.done and not follower.failed and protocol.parsed == 0
    answer = follower.answer  # asked for (after a break, say): parsed now, in order
    assert (answer.content, answer.finish_reason, answer.events, answer.complete) == ("Hello", "stop", 4, True)
    assert protocol.parsed == 3


def test_a_lazy_follower_parses_what_came_before_an_error_event_first():
    follower = StreamFollower(CountingChat(), lazy=True)
    wire = event({"content": "a"}) + b'data: {"error": {"message": "overloaded"}}\n\n' + event({"content": "b"})
    assert follower.feed(wire) == event({"content": "a"}) and follower.failed
    assert follower.answer.error == {"message": "overloaded"} and follower.answer.content == "a"


def test_the_first_token_of_a_stream_whose_every_event_is_one_is_known_without_parsing_it():
    """The gate's follower: an OpenAI stream has passed at its first data event, an error first fails it;
    a stream that opens with events carrying no token (Anthropic's) is parsed until content comes."""
    protocol = CountingChat()
    follower = StreamFollower(protocol, lazy=not protocol.opens_before_content)
    assert not follower.started
    follower.feed(b": keep-alive\n\n")
    assert not follower.started
    follower.feed(event({"role": "assistant", "content": "Hel"}))
    assert follower.started and not follower.failed and protocol.parsed == 0
    failing = StreamFollower(CountingChat(), lazy=True)
    failing.feed(b'data: {"error": {"message": "overloaded"}}\n\n')
    assert failing.failed and not failing.started
    anthropic = PROTOCOLS["anthropic"]
    opening = StreamFollower(anthropic, lazy=not anthropic.opens_before_content)
    opening.feed(b'event: message_start\ndata: {"type": "message_start", "message": {"id": "m"}}\n\n')
    assert not opening.started
    opening.feed(b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
                 b'"delta": {"type": "text_delta", "text": "Hi"}}\n\n')
    assert opening.started


def test_a_lazy_follower_passes_an_event_with_a_null_error_on_as_content():
    follower = StreamFollower(CHAT, lazy=True)
    wire = event({"content": "a"}) + event({"content": "b"}, error=None) + event({}, "stop") + b"data: [DONE]\n\n"
    assert follower.feed(wire) == wire and follower.done and not follower.failed
    assert follower.answer.content == "ab"
