"""Mid-stream continuation: follow a streamed answer as the client receives it, and splice its rest.

Pure: bytes and dicts in, bytes and dicts out. The hand-off (`proxy/handoff.py`) feeds every chunk it
forwards to a `StreamFollower`, which knows what the client already has (the text, the stream's id and
model, whether a tool call is half-sent) and whether the stream ended as its protocol says it must.
When the stream breaks, `plan_resume` says whether it can be continued; `continuation_body` makes the
request that asks another upstream for the rest (the partial answer as a final assistant message, in
the form that upstream's `resume` names); a `Splicer` rewrites the continuation's events so that they
belong to the client's stream.

A protocol plugs in as a `StreamProtocol`: OpenAI chat completions and legacy completions, Anthropic
Messages, OpenAI Responses and Ollama's native API. Each says how its stream is framed (SSE events, or
Ollama's newline-delimited JSON), what its first token is (not the opening events servers send before
any: `message_start`, `response.created`, pings), what an in-band error and the stream's proper end look
like, and how (or whether) an answer broken in it can be continued elsewhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .sse import EVENT_END

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

    `lazy`: an event is parsed only when it may end the stream (the protocol's `urgent` events: its
    end, an error) or when `answer` is asked for (after a break); the others are kept as they came, up
    to `LAZY_BYTES`, so a stream that ends well costs a scan for event boundaries, not a JSON parse per
    event. The gate follows lazily too where every data event is a token (`started`), eagerly where the
    stream opens with events that carry none (`opens_before_content`).
    """

    LAZY_BYTES = 256 * 1024  # raw events kept unparsed per stream; beyond, they are parsed and dropped

    def __init__(self, protocol: StreamProtocol, usage_wanted: bool = False, lazy: bool = False) -> None:
        self.protocol = protocol
        self.lazy = lazy
        self._answer = Answer(usage_wanted=usage_wanted)
        self.progressed = False  # the last `feed` completed a data event (comments are not progress)
        self._buffer = b""
        self._unread: list[bytes] = []  # data events not parsed yet (lazy)
        self._unread_bytes = 0

    @property
    def answer(self) -> Answer:
        """What the client has of the answer, every event parsed."""
        self._catch_up()
        return self._answer

    @property
    def done(self) -> bool:
        """The protocol's end arrived (known without parsing every event)."""
        return self._answer.done

    @property
    def failed(self) -> bool:
        """An in-band error event arrived (it was not passed on)."""
        return self._answer.error is not None

    @property
    def started(self) -> bool:
        """The first token has come: for an API whose every data event is one, known without parsing them."""
        if not self.protocol.opens_before_content:
            return self._answer.events > 0
        return self.protocol.started(self.answer)

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from the upstream; return those the client may have now."""
        buffer = self._buffer + chunk if self._buffer else chunk
        protocol, forward = self.protocol, 0
        self.progressed = False
        for match in protocol.boundary.finditer(buffer):
            event = buffer[forward:match.start()]
            if self.lazy and not protocol.urgent.search(event):
                if protocol.has_data(event):
                    self._keep(event)
            elif not self._follow(event):
                self._buffer = b""
                return buffer[:forward]
            forward = match.end()
        self._buffer = buffer[forward:]
        return buffer[:forward]

    def _follow(self, event: bytes) -> bool:
        """Parse one event now (the ones before it first); False: it is an in-band error.

        The stream's end needs no events before it parsed (nobody needs them once the answer is whole):
        `[DONE]`, or a lazy follower's closing event that ends the answer by itself, kept with the
        others, in order."""
        data = self.protocol.data_of(event)
        if data is None:
            return True
        answer = self._answer
        if data.strip() == DONE:
            answer.done = True
        elif self.lazy and self._ends_alone(data):
            self._keep(event)
            answer.done = True
            return True
        else:
            self._catch_up()
            self.protocol.follow(answer, data)
            if answer.error is not None:
                return False
        answer.events += 1
        self.progressed = True
        return True

    def _ends_alone(self, data: str) -> bool:
        alone = Answer()
        self.protocol.follow(alone, data)
        return alone.done and alone.error is None

    def _keep(self, event: bytes) -> None:
        self._answer.events += 1
        self.progressed = True
        self._unread.append(event)
        self._unread_bytes += len(event)
        if self._unread_bytes > self.LAZY_BYTES:
            self._catch_up()

    def _catch_up(self) -> None:
        if not self._unread:
            return
        unread, self._unread, self._unread_bytes = self._unread, [], 0
        for event in unread:
            data = self.protocol.data_of(event)
            if data is not None and data.strip() != DONE:
                self.protocol.follow(self._answer, data)

    @property
    def pending(self) -> int:
        """Bytes held back: the start of an event not yet complete."""
        return len(self._buffer)


class StreamProtocol:
    """How one API streams an answer and how it can be continued."""

    name = "base"
    api = "openai"  # the name an upstream's `protocols` lists when it speaks this API
    boundary = EVENT_END  # what ends one event: SSE's blank line
    urgent = re.compile(rb'"error"|\[DONE\]')  # an event that may end the stream: followed at once
    opens_before_content = False  # the stream opens with events that carry no token (see `started`)

    def data_of(self, event: bytes) -> str | None:
        """One event's data; None for an event without (a comment)."""
        return _event_data(event)

    def has_data(self, event: bytes) -> bool:
        """Whether `data_of` would find data in the event (cheaply, without decoding it)."""
        return event.startswith(b"data:") or b"\ndata:" in event

    def streams(self, payload: dict) -> bool:
        """The request asks for a streamed answer."""
        return payload.get("stream") is True

    def started(self, answer: Answer) -> bool:
        """The first token has come. OpenAI's servers send none of their events before it; an API whose
        stream opens with events that carry none (`message_start`, pings, `response.created`) waits for
        content (`opens_before_content`)."""
        if not self.opens_before_content:
            return answer.events > 0
        return bool(answer.content_events or answer.reasoning or answer.tool_call_started or answer.done
                    or answer.finish_reason)

    def follow(self, answer: Answer, data: str) -> None:
        """One event's data, followed into `answer`; data that is not a JSON object is passed over."""
        obj = _json(data)
        if obj is not None:
            self.follow_object(answer, obj)

    def follow_object(self, answer: Answer, obj: dict) -> None:
        raise NotImplementedError

    @property
    def end_marker(self) -> bytes:
        """What ends a stream whose answer is whole but whose closing marker is missing."""
        return b"data: [DONE]\n\n"

    def error_event(self, message: str, code: str) -> bytes:
        """A well-formed in-band error, as this API sends one."""
        return error_event(message, code)

    def encode(self, obj: dict) -> bytes:
        """One (rewritten) event on the wire."""
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

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


class OpenAIEvents(StreamProtocol):
    """OpenAI's streamed events: an object with `choices` (choice 0 followed), `usage`, or `error`."""

    def follow_object(self, answer: Answer, obj: dict) -> None:
        if obj.get("error") is not None:
            answer.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return
        _note_identity(answer, obj)
        if isinstance(obj.get("usage"), dict):
            answer.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self.follow_choice(answer, choice)
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]

    def follow_choice(self, answer: Answer, choice: dict) -> None:
        raise NotImplementedError


class ChatCompletions(OpenAIEvents):
    """OpenAI chat completions (`/v1/chat/completions`), `chat.completion.chunk` events."""

    name = "openai-chat"

    def follow_choice(self, answer: Answer, choice: dict) -> None:
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


class TextCompletions(OpenAIEvents):
    """Legacy completions (`/v1/completions`): the continuation is the prompt plus the partial text."""

    name = "openai-completions"

    def follow_choice(self, answer: Answer, choice: dict) -> None:
        if choice.get("text"):
            answer.text.append(choice["text"])
            answer.content_events += 1

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        if not isinstance(payload.get("prompt"), str):
            return "the prompt is not a single string"
        if payload.get("echo") or payload.get("suffix"):
            return "the request used echo or suffix"
        return super().unsafe_to_resume(answer, payload)

    def continuation_body(self, payload: dict, answer: Answer, mode: str) -> dict:
        return _fewer_tokens({**payload, "prompt": payload["prompt"] + answer.content}, answer.content_events)


def _sse_event(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class AnthropicMessages(StreamProtocol):
    """Anthropic Messages (`/v1/messages`): `message_start`, `content_block_start`, `ping`,
    `content_block_delta`..., `message_delta`, `message_stop`; `event: error` in-band. Continued with the
    API's native prefill: the partial answer as the last, assistant, message."""

    name = api = "anthropic"
    opens_before_content = True
    urgent = re.compile(rb'"error"|message_stop')

    def follow_object(self, answer: Answer, obj: dict) -> None:
        kind = obj.get("type")
        if kind == "error" or (kind is None and obj.get("error") is not None):
            error = obj.get("error")
            answer.error = error if isinstance(error, dict) else {"message": str(error)}
        elif kind == "message_start" and isinstance(obj.get("message"), dict):
            message = obj["message"]
            answer.role_sent = True
            if answer.id is None:
                answer.id, answer.model = message.get("id"), message.get("model")
        elif kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") in ("tool_use", "server_tool_use"):
                answer.tool_call_started = True
        elif kind == "content_block_delta":
            self._delta(answer, obj.get("delta") or {})
        elif kind == "message_delta":
            stop = (obj.get("delta") or {}).get("stop_reason")
            if stop:
                answer.finish_reason = stop
            if isinstance(obj.get("usage"), dict):
                answer.usage = obj["usage"]
        elif kind == "message_stop":
            answer.done = True

    @staticmethod
    def _delta(answer: Answer, delta: dict) -> None:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            answer.text.append(delta["text"])
            answer.content_events += 1
        elif kind == "thinking_delta" and delta.get("thinking"):
            answer.reasoning.append(delta["thinking"])
        elif kind == "input_json_delta":
            answer.tool_call_started = True

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        if not answer.text:
            return "no text was sent yet"
        if answer.content != answer.content.rstrip():
            return "the partial answer ends in whitespace, which Anthropic refuses in a prefill"
        return super().unsafe_to_resume(answer, payload)

    def continuation_body(self, payload: dict, answer: Answer, mode: str) -> dict:
        prefill = {"role": "assistant", "content": answer.content}
        return _fewer_tokens({**payload, "messages": [*payload.get("messages", []), prefill]}, answer.content_events)

    @property
    def end_marker(self) -> bytes:
        return _sse_event("message_stop", {"type": "message_stop"})

    def error_event(self, message: str, code: str) -> bytes:
        return _sse_event("error", {"type": "error", "error": {"type": "api_error", "message": message}})

    def encode(self, obj: dict) -> bytes:
        return _sse_event(str(obj.get("type", "message")), obj)

    def rewrite(self, obj: dict, answer: Answer, produced: int) -> dict | None:
        kind = obj.get("type")
        if kind in ("message_start", "ping") or (kind == "content_block_start" and obj.get("index") == 0):
            return None  # the client had the message and its first block opened already
        usage = obj.get("usage")
        if kind == "message_delta" and isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
            obj["usage"] = {**usage, "output_tokens": usage["output_tokens"] + produced}
        return obj


class Responses(StreamProtocol):
    """OpenAI Responses (`/v1/responses`): `response.created`, `response.in_progress`, ...,
    `response.output_text.delta`..., `response.completed`; `response.failed` and `error` in-band.

    Not continued elsewhere: the API has no assistant prefill (an assistant message in `input` is a
    finished turn, and the model answers it afresh)."""

    name = api = "responses"
    opens_before_content = True
    _END = {"response.completed", "response.incomplete"}
    urgent = re.compile(rb'"error"|response\.(completed|incomplete|failed)')

    def follow_object(self, answer: Answer, obj: dict) -> None:
        kind = str(obj.get("type", ""))
        response = _mapping(obj.get("response"))
        if kind == "error":
            answer.error = {k: v for k, v in obj.items() if k in ("code", "message", "param")} or {"message": json.dumps(obj)}
        elif kind == "response.failed":
            error = response.get("error")
            answer.error = error if isinstance(error, dict) else {"message": "response.failed"}
        elif kind == "response.created" and answer.id is None:
            answer.id, answer.model, answer.created = response.get("id"), response.get("model"), response.get("created_at")
        elif kind == "response.output_text.delta" and obj.get("delta"):
            answer.text.append(str(obj["delta"]))
            answer.content_events += 1
        elif kind.startswith("response.reasoning") and kind.endswith(".delta") and obj.get("delta"):
            answer.reasoning.append(str(obj["delta"]))
        elif kind == "response.function_call_arguments.delta" or (
                kind == "response.output_item.added" and (obj.get("item") or {}).get("type") == "function_call"):
            answer.tool_call_started = True
        elif kind in self._END:
            answer.done = True
            answer.finish_reason = response.get("status") or kind
            answer.usage = response.get("usage") if isinstance(response.get("usage"), dict) else None

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        return "the Responses API has no assistant prefill to continue an answer with"

    @property
    def end_marker(self) -> bytes:
        return b""

    def error_event(self, message: str, code: str) -> bytes:
        return _sse_event("error", {"type": "error", "code": code, "message": message, "param": None})

    def encode(self, obj: dict) -> bytes:
        return _sse_event(str(obj.get("type", "message")), obj)


class OllamaNative(StreamProtocol):
    """Ollama's native API (`/api/chat`, `/api/generate`): newline-delimited JSON, streamed unless
    `"stream": false`; the last line has `"done": true`; an error is an `{"error": ...}` line.

    Not continued elsewhere: how a final assistant message is treated depends on the model's template in
    Ollama, so a prefill is not a documented continuation."""

    name = "ollama"
    opens_before_content = True
    api = "ollama"
    boundary = re.compile(rb"\r?\n")
    urgent = re.compile(rb'"error"|"done"\s*:\s*true')

    def data_of(self, event: bytes) -> str | None:
        line = event.strip()
        return line.decode("utf-8", "replace") if line else None

    def has_data(self, event: bytes) -> bool:
        return bool(event.strip())

    def streams(self, payload: dict) -> bool:
        return payload.get("stream", True) is not False

    def follow_object(self, answer: Answer, obj: dict) -> None:
        if obj.get("error") is not None:
            answer.error = {"message": str(obj["error"])}
            return
        if answer.model is None:
            answer.model = obj.get("model")
        message = _mapping(obj.get("message"))
        text = message.get("content") or obj.get("response")
        if text:
            answer.text.append(str(text))
            answer.content_events += 1
        if message.get("thinking") or obj.get("thinking"):
            answer.reasoning.append(str(message.get("thinking") or obj.get("thinking")))
        if message.get("tool_calls"):
            answer.tool_call_started = True
        if obj.get("done") is True:
            answer.done = True
            answer.finish_reason = obj.get("done_reason") or "stop"

    def unsafe_to_resume(self, answer: Answer, payload: dict) -> str | None:
        return "Ollama's native API has no documented assistant prefill to continue an answer with"

    @property
    def end_marker(self) -> bytes:
        return b""

    def error_event(self, message: str, code: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"

    def encode(self, obj: dict) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


PROTOCOLS: dict[str, StreamProtocol] = {p.name: p for p in (ChatCompletions(), TextCompletions(), AnthropicMessages(),
                                                            Responses(), OllamaNative())}
APIS = ("openai", "anthropic", "responses", "ollama")  # what an upstream's `protocols` may list


def protocol_for(path: str, payload: dict) -> StreamProtocol | None:
    """The streaming protocol of a request, by path and body; None: not one llm-ha can follow."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions") and isinstance(payload.get("messages"), list):
        return PROTOCOLS["openai-chat"]
    if path.endswith("/completions") and "prompt" in payload:
        return PROTOCOLS["openai-completions"]
    if path.endswith("/v1/messages") and isinstance(payload.get("messages"), list):
        return PROTOCOLS["anthropic"]
    if path.endswith("/v1/responses") and "input" in payload:
        return PROTOCOLS["responses"]
    if path.endswith(("/api/chat", "/api/generate")):
        return PROTOCOLS["ollama"]
    return None


def api_of(path: str, payload: dict) -> str | None:
    """Which API a request speaks (the name upstreams' `protocols` list); None: unknown traffic."""
    protocol = protocol_for(path, payload)
    if protocol is not None:
        return protocol.api
    path = path.split("?", 1)[0].rstrip("/")
    if "/api/" in path and path.endswith(("/api/embed", "/api/embeddings")):
        return "ollama"
    if path.endswith("/v1/embeddings"):
        return "openai"
    if "/v1/messages" in path:  # count_tokens, batches
        return "anthropic"
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
        buffer, start = self._buffer + chunk, 0
        out = []
        for match in self.protocol.boundary.finditer(buffer):
            event, start = buffer[start:match.end()], match.end()
            data = self.protocol.data_of(event)
            obj = None if data is None or data.strip() == DONE else _json(data)
            if obj is None:
                out.append(event)
                continue
            rewritten = self.protocol.rewrite(obj, self.answer, self.produced)
            if rewritten is not None:
                out.append(self.protocol.encode(rewritten))
        self._buffer = buffer[start:]
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


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


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
