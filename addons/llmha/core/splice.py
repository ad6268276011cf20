"""Mid-stream continuation: follow a streamed answer as the client receives it, and splice its rest.

Pure: bytes and dicts in, bytes and dicts out. The hand-off (`proxy/handoff.py`) feeds every chunk it
forwards to a `StreamFollower`, which knows what the client already has (the text, the stream's id and
model, whether a tool call is half-sent) and whether the stream ended as its protocol says it must.
When the stream breaks, `plan_resume` says whether it can be continued; `continuation_body` makes the
request that asks another upstream for the rest (the partial answer as a final assistant message, in
the form that upstream's `resume` names); a `Splicer` rewrites the continuation's events so that they
belong to the client's stream.

A protocol plugs in as a `StreamProtocol`: OpenAI chat completions and legacy completions today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .sse import EVENT_END, split_events

DONE = "[DONE]"


@dataclass
class Answer:
    """What the client has received of one streamed answer (choice 0)."""

    id: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    role_sent: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_call_started: bool = False
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False  # the protocol's own end ([DONE]) was received
    error: dict | None = None  # an in-band error event
    events: int = 0  # data events, the first included
    content_events: int = 0  # events that carried text (one token each, as servers stream)
    usage_wanted: bool = False  # the client asked for usage: a whole answer ends with it

    @property
    def content(self) -> str:
        return "".join(self.text)

    @property
    def complete(self) -> bool:
        """The answer as such is whole: only the stream's closing marker may be missing."""
        return self.done or (self.finish_reason is not None and (self.usage is not None or not self.usage_wanted))


class StreamFollower:
    """Follows one SSE stream on bytes, as the client receives it.

    `feed` passes on only whole events, so a stream broken mid-event never leaves half an event with
    the client, and it stops before an in-band error event, which the client must not see if the
    answer is continued elsewhere.
    """

    def __init__(self, protocol: StreamProtocol, usage_wanted: bool = False) -> None:
        self.protocol = protocol
        self.answer = Answer(usage_wanted=usage_wanted)
        self.progressed = False  # the last `feed` completed a data event (comments are not progress)
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from the upstream; return those the client may have now."""
        buffer = self._buffer + chunk
        answer, forward = self.answer, 0
        self.progressed = False
        for match in EVENT_END.finditer(buffer):
            data = _event_data(buffer[forward:match.start()])
            if data is not None:
                if data.strip() == DONE:
                    answer.done = True
                else:
                    self.protocol.follow(answer, data)
                    if answer.error is not None:
                        self._buffer = b""
                        return buffer[:forward]
                answer.events += 1
                self.progressed = True
            forward = match.end()
        self._buffer = buffer[forward:]
        return buffer[:forward]


class StreamProtocol:
    """How one API streams an answer and how it can be continued."""

    name = "base"

    def follow(self, answer: Answer, data: str) -> None:
        raise NotImplementedError

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        """Why this answer must not be continued elsewhere; None when it may."""
        if isinstance(payload.get("n"), int) and payload["n"] > 1:
            return "the request asked for n > 1 choices"
        if payload.get("logprobs") or payload.get("top_logprobs"):
            return "the request asked for logprobs"
        if answer.tool_call_started:
            return "a tool call was half-sent"
        if answer.reasoning and not answer.text:
            return "the answer was still in its reasoning phase"
        return None

    def continuation_body(self, payload: dict, answer: Answer, mode: str) -> dict:
        raise NotImplementedError

    def rewrite(self, obj: dict, answer: Answer, produced: int) -> dict | None:
        """A continuation event made part of the client's stream (`produced`: tokens before the splice);
        None: drop it."""
        for key in ("id", "created", "model", "system_fingerprint"):
            if getattr(answer, key) is not None and key in obj:
                obj[key] = getattr(answer, key)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            obj["usage"] = _whole_usage(usage, produced)
        return obj


class ChatCompletions(StreamProtocol):
    """OpenAI chat completions (`/v1/chat/completions`), `chat.completion.chunk` events."""

    name = "openai-chat"

    def follow(self, answer: Answer, data: str) -> None:
        obj = _json(data)
        if obj is None:
            return
        if obj.get("error") is not None:
            answer.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return
        _note_identity(answer, obj)
        if isinstance(obj.get("usage"), dict):
            answer.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("role"):
                answer.role_sent = True
            if delta.get("content"):
                answer.text.append(delta["content"])
                answer.content_events += 1
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                answer.reasoning.append(reasoning)
            if delta.get("tool_calls") or delta.get("function_call"):
                answer.tool_call_started = True
            if choice.get("finish_reason"):
                answer.finish_reason = choice["finish_reason"]

    def continuation_body(self, payload: dict, answer: Answer, mode: str) -> dict:
        prefill: dict[str, Any] = {"role": "assistant", "content": answer.content}
        body = {**payload, "messages": [*payload.get("messages", []), prefill]}
        if mode == "prefill-vllm":
            body.update(continue_final_message=True, add_generation_prompt=False)
        elif mode == "prefill-deepseek":
            prefill["prefix"] = True
        return _fewer_tokens(body, answer.content_events)

    def rewrite(self, obj: dict, answer: Answer, produced: int) -> dict | None:
        obj = super().rewrite(obj, answer, produced) or obj
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return obj
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                delta.pop("role", None)  # the client had its role delta already
                if delta.get("content") == "":
                    del delta["content"]
        if not obj.get("usage") and all(_empty_choice(c) for c in choices):
            return None  # the continuation's opening role delta: nothing the client needs
        return obj


class TextCompletions(StreamProtocol):
    """Legacy completions (`/v1/completions`): the continuation is the prompt plus the partial text."""

    name = "openai-completions"

    def follow(self, answer: Answer, data: str) -> None:
        obj = _json(data)
        if obj is None:
            return
        if obj.get("error") is not None:
            answer.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return
        _note_identity(answer, obj)
        if isinstance(obj.get("usage"), dict):
            answer.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("text"):
                answer.text.append(choice["text"])
                answer.content_events += 1
            if choice.get("finish_reason"):
                answer.finish_reason = choice["finish_reason"]

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        if not isinstance(payload.get("prompt"), str):
            return "the prompt is not a single string"
        if payload.get("echo") or payload.get("suffix"):
            return "the request used echo or suffix"
        return super().unsafe_to_resume(answer, payload)

    def continuation_body(self, payload: dict, answer: Answer, mode: str) -> dict:
        return _fewer_tokens({**payload, "prompt": payload["prompt"] + answer.content}, answer.content_events)


PROTOCOLS: dict[str, StreamProtocol] = {p.name: p for p in (ChatCompletions(), TextCompletions())}


def protocol_for(path: str, payload: dict) -> StreamProtocol | None:
    """The streaming protocol of a request, by path and body; None: not one llm-ha can follow."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions") and isinstance(payload.get("messages"), list):
        return PROTOCOLS["openai-chat"]
    if path.endswith("/completions") and "prompt" in payload:
        return PROTOCOLS["openai-completions"]
    return None


@dataclass(frozen=True)
class ResumePlan:
    possible: bool
    reason: str  # why not, when not possible


def plan_resume(protocol: StreamProtocol, answer: Answer, payload: dict) -> ResumePlan:
    why_not = protocol.unsafe_to_resume(answer, payload)
    return ResumePlan(why_not is None, why_not or "")


class Splicer:
    """Rewrites a continuation's bytes, event by event, into the client's stream."""

    def __init__(self, protocol: StreamProtocol, answer: Answer) -> None:
        self.protocol = protocol
        self.answer = answer
        self.produced = answer.content_events  # what the continuation's prompt held of the answer
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        events, self._buffer = split_events(self._buffer + chunk)
        out = []
        for event in events:
            data = _event_data(event)
            if data is None or data.strip() == DONE:
                out.append(event + b"\n\n")
                continue
            obj = _json(data)
            if obj is None:
                out.append(event + b"\n\n")
                continue
            rewritten = self.protocol.rewrite(obj, self.answer, self.produced)
            if rewritten is not None:
                out.append(b"data: " + json.dumps(rewritten, separators=(",", ":")).encode() + b"\n\n")
        return b"".join(out)


def splice_comment(text: str) -> bytes:
    """An SSE comment line (ignored by clients) marking the splice for people reading raw streams."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def error_event(message: str, code: str) -> bytes:
    """A well-formed in-band OpenAI error event."""
    body = {"error": {"message": message, "type": "upstream_error", "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _event_data(event: bytes) -> str | None:
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines).decode("utf-8", "replace") if lines else None


def _json(data: str) -> dict | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _note_identity(answer: Answer, obj: dict) -> None:
    if answer.id is None:
        answer.id = obj.get("id")
        answer.created = obj.get("created")
        answer.model = obj.get("model")
        answer.system_fingerprint = obj.get("system_fingerprint")


def _empty_choice(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    return not choice.get("delta") and not choice.get("text") and not choice.get("finish_reason")


def _fewer_tokens(body: dict, produced: int) -> dict:
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = max(1, body[key] - produced)
    return body


def _whole_usage(usage: dict, produced: int) -> dict:
    """The continuation's usage, counted for the whole answer: its prompt held the partial answer."""
    completion = int(usage.get("completion_tokens") or 0) + produced
    prompt = max(0, int(usage.get("prompt_tokens") or 0) - produced)
    return {**usage, "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
