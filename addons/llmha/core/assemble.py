"""Fold a streamed chat completion back into the `chat.completion` a non-streaming client asked for.

For a non-streaming chat completion llm-ha asks an OpenAI-compatible upstream for a stream (with
`stream_options.include_usage`), so that the first token can be gated by `first_byte_timeout` like a
streaming request's (`proxy/gate.py`). This module turns that stream's `chat.completion.chunk`
events into the one `chat.completion` the client expects, choice by choice: the message's content,
reasoning (`reasoning_content` or `reasoning`, whichever the server streams), refusal, tool calls
(merged by index, their arguments concatenated), the legacy `function_call`, logprobs, the finish
reason, and the usage.

Pure: bytes in, dict out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .sse import event_data, split_events

DONE = "[DONE]"
_IDENTITY = ("id", "created", "model", "system_fingerprint", "service_tier")


@dataclass
class _Choice:
    index: int
    message: dict = field(default_factory=lambda: {"role": "assistant", "content": None})
    tool_calls: dict[int, dict] = field(default_factory=dict)
    logprobs: dict[str, list] | None = None
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)  # other per-choice fields (vLLM's stop_reason, ...)

    def add(self, choice: dict) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        if isinstance(choice.get("logprobs"), dict):
            self._add_logprobs(choice["logprobs"])
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        for key, value in choice.items():
            if key not in ("index", "delta", "logprobs", "finish_reason") and value is not None:
                self.extra[key] = value

    def _add_delta(self, delta: dict) -> None:
        for key, value in delta.items():
            if value is None:
                continue
            if key == "role":
                self.message["role"] = value
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        self._add_tool_call(call)
            elif key == "function_call" and isinstance(value, dict):
                _merge_call(self.message.setdefault("function_call", {}), value)
            elif isinstance(value, str):  # content, reasoning_content, reasoning, refusal, ...
                self.message[key] = (self.message.get(key) or "") + value
            else:
                self.message[key] = value

    def _add_tool_call(self, call: dict) -> None:
        index = call.get("index", len(self.tool_calls))
        merged = self.tool_calls.setdefault(index, {})
        for key, value in call.items():
            if key == "index" or value is None:
                continue
            if key == "function" and isinstance(value, dict):
                _merge_call(merged.setdefault("function", {}), value)
            else:
                merged[key] = value

    def _add_logprobs(self, logprobs: dict) -> None:
        self.logprobs = self.logprobs or {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, []).extend(value)

    def to_dict(self) -> dict:
        message = dict(self.message)
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", **self.tool_calls[i]} for i in sorted(self.tool_calls)]
            message["content"] = message.get("content") or None  # as a non-streamed tool call has it
        return {"index": self.index, "message": message, "logprobs": self.logprobs,
                "finish_reason": self.finish_reason, **self.extra}


def _merge_call(merged: dict, part: dict) -> None:
    """A function call's name comes whole (the first time it is sent); its arguments come in pieces."""
    for key, value in part.items():
        if value is None:
            continue
        if key == "arguments" and isinstance(value, str):
            merged[key] = merged.get(key, "") + value
        elif key not in merged:
            merged[key] = value


class CompletionAssembler:
    """Feed it the stream's bytes as they come; `completion()` is the assembled `chat.completion`."""

    def __init__(self) -> None:
        self._buffer = b""
        self._identity: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self.usage: dict | None = None
        self.events = 0  # data events, [DONE] included
        self.done = False  # `data: [DONE]` arrived
        self.error: dict | None = None  # an error event: the stream failed
        self.ignored = 0  # data events that are not JSON objects (no chunk of the answer; not an error either)

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes; returns how many data events they completed."""
        events, self._buffer = split_events(self._buffer + chunk)
        count = 0
        for event in events:
            data = event_data(event)
            if data is None:
                continue  # a comment or keep-alive
            count += 1
            self._add_event(data)
        self.events += count
        return count

    def finish(self) -> None:
        """The stream ended: an event not followed by a blank line still counts."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self.feed(rest + b"\n\n")

    @property
    def complete(self) -> bool:
        """The stream ended as the protocol says it must: `[DONE]`, or every choice with its finish reason."""
        if self.error is not None:
            return False
        finished = bool(self._choices) and all(c.finish_reason is not None for c in self._choices.values())
        return finished or (self.done and bool(self._choices))

    def completion(self) -> dict:
        body: dict[str, Any] = {key: self._identity[key] for key in _IDENTITY if key in self._identity}
        body["object"] = "chat.completion"
        body["choices"] = [self._choices[i].to_dict() for i in sorted(self._choices)]
        if self.usage is not None:
            body["usage"] = self.usage
        return body

    def _add_event(self, data: str) -> None:
        if data.strip() == DONE:
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self.ignored += 1
            return
        if obj.get("error") is not None:
            error = obj["error"]
            self.error = error if isinstance(error, dict) else {"message": str(error)}
            return
        for key in _IDENTITY:
            if obj.get(key) is not None:
                self._identity.setdefault(key, obj[key])
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("index", 0), int):
                index = choice.get("index", 0)
                self._choices.setdefault(index, _Choice(index)).add(choice)


def assemble(body: bytes) -> CompletionAssembler:
    """A whole SSE body, assembled (for tests and recordings)."""
    assembler = CompletionAssembler()
    assembler.feed(body)
    assembler.finish()
    return assembler
