"""Assembling a streamed chat completion into the `chat.completion` a non-streaming client asked for."""

import json

from llmha.core.assemble import CompletionAssembler, assemble


def sse(*objects) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objects)


def chunk(choices, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
            "system_fingerprint": "fp", "choices": choices, **extra}


def delta(index=0, finish=None, logprobs=None, **d) -> dict:
    return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}


def test_text_reasoning_finish_reason_and_usage():
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    body = sse(chunk([delta(role="assistant", content="")]),
               chunk([delta(reasoning_content="think ")]), chunk([delta(reasoning_content="hard")]),
               chunk([delta(content="Hel")]), chunk([delta(content="lo")]),
               chunk([delta(finish="stop", stop_reason=None)]),
               chunk([], usage=usage), b"[DONE]")
    result = assemble(body)
    assert result.complete and result.done
    assert result.completion() == {
        "id": "chatcmpl-1", "created": 1700000000, "model": "m", "system_fingerprint": "fp",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello",
                                             "reasoning_content": "think hard"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage}


def test_tool_calls_merged_by_index_with_their_arguments_concatenated():
    body = sse(
        chunk([delta(role="assistant", content=None, tool_calls=[
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])]),
        chunk([delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                  "function": {"name": "time", "arguments": "{}"}}])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])]),
        chunk([delta(finish="tool_calls")]), b"[DONE]")
    message = assemble(body).completion()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"type": "function", "id": "call_a", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "id": "call_b", "function": {"name": "time", "arguments": "{}"}}]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_several_choices_and_logprobs():
    lp = lambda token: {"content": [{"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    body = sse(chunk([delta(0, role="assistant", content="a", logprobs=lp("a")),
                      delta(1, role="assistant", content="x", logprobs=lp("x"))]),
               chunk([delta(1, content="y", logprobs=lp("y"), finish="length")]),
               chunk([delta(0, content="b", logprobs=lp("b"), finish="stop")]))
    result = assemble(body)
    assert result.complete and not result.done  # every choice finished: whole even without [DONE]
    choices = result.completion()["choices"]
    assert [c["message"]["content"] for c in choices] == ["ab", "xy"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert [t["token"] for t in choices[1]["logprobs"]["content"]] == ["x", "y"]


def test_a_cut_stream_is_not_complete():
    result = assemble(sse(chunk([delta(role="assistant", content="Hel")])))
    assert not result.complete


def test_an_error_event_fails_the_stream():
    result = assemble(sse(chunk([delta(content="a")]), {"error": {"message": "overloaded", "code": 503}}))
    assert not result.complete and result.error == {"message": "overloaded", "code": 503}


def test_fed_in_arbitrary_pieces_with_keep_alives():
    body = b": keep-alive\n\n" + sse(chunk([delta(role="assistant", content="hi")]),
                                     chunk([delta(finish="stop")]), b"[DONE]")
    assembler = CompletionAssembler()
    counts = [assembler.feed(body[i:i + 7]) for i in range(0, len(body), 7)]
    assert sum(counts) == 3 and assembler.complete
    assert assembler.completion()["choices"][0]["message"]["content"] == "hi"


def test_last_event_without_its_blank_line_counts_at_the_end():
    body = sse(chunk([delta(role="assistant", content="hi")])) + b"data: " + json.dumps(
        chunk([delta(finish="stop")])).encode()
    assert assemble(body).complete


def test_a_data_event_that_is_no_json_object_is_left_out():
    body = sse(chunk([delta(role="assistant", content="hi")])) + b"data: ping\n\n" + sse(chunk([delta(finish="stop")]))
    result = assemble(body)
    assert result.complete and result.ignored == 1
    assert result.completion()["choices"][0]["message"]["content"] == "hi"
