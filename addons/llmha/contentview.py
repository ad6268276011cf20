"""The "LLM stream" content view: an OpenAI-style chat completion, assembled, for mitmproxy's console and web UI.

For a streamed answer (`text/event-stream` of `chat.completion.chunk` events) it shows the assistant
message put back together (content, and `reasoning_content` when the model sends it), the model, the
finish reason, the usage, the number of chunks, the time to the first chunk, and llm-ha's attempt
summary and attempts, as a table. A plain `chat.completion` JSON answer gets the same, without chunks.
Anthropic Messages and OpenAI Responses streams, and Ollama's newline-delimited JSON streams, are
assembled the same way, by the protocol that follows them through llm-ha (`core/splice.py`).

For a flow that went through llm-ha, the first chunk line gives both what the client waited (from its
request to the answering attempt's first byte, failed attempts included) and what the answering
attempt took, from llm-ha's record. Otherwise it is approximated from the flow's timestamps (request
start to response headers), since mitmproxy keeps no per-chunk times.

Registering (the addon does it): `contentviews.add(llm_stream_view)` in `load`, `remove_view()` in `done`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from .core.splice import PROTOCOLS, Answer, StreamProtocol, protocol_for
from .core.sse import error_in, iter_data
from .core.types import META_KEY

SSE_PRIORITY = 2.0  # above every built-in view (JSON is 1, raw 0.1)
JSON_PRIORITY = 1.1  # just above the JSON view, for chat.completion answers


@dataclass
class Choice:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Completion:
    """What the chunks (or the one JSON object) of a chat completion add up to."""

    model: str | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict | None = None
    chunks: int = 0
    done: bool = False  # the stream ended with `data: [DONE]` (its protocol's end)
    errors: list[str] = field(default_factory=list)
    end: str = "[DONE]"  # what the protocol's end is called

    def choice(self, index: int) -> Choice:
        return self.choices.setdefault(index, Choice())


def assemble_stream(body: bytes) -> Completion:
    """Assemble an SSE body of chat.completion.chunk events."""
    completion = Completion()
    for data in iter_data(body):
        if data.strip() == "[DONE]":
            completion.done = True
            continue
        error = error_in(data)
        if error is not None:
            completion.errors.append(str(error.get("message", error)))
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if isinstance(chunk, dict):
            completion.chunks += 1
            _add_chunk(completion, chunk)
    return completion


def assemble_protocol(body: bytes, protocol: StreamProtocol) -> Completion:
    """Assemble a stream of another API (Anthropic Messages, Responses, Ollama) as its protocol follows it."""
    answer = Answer()
    errors = []
    start = 0
    for match in [*protocol.boundary.finditer(body), None]:
        end = match.start() if match else len(body)
        data = protocol.data_of(body[start:end])
        start = match.end() if match else len(body)
        if data is None:
            continue
        protocol.follow(answer, data)
        answer.events += 1
        if answer.error is not None:
            errors.append(str(answer.error.get("message", answer.error)))
            answer.error = None
    choice = Choice(answer.text, answer.reasoning, answer.finish_reason)
    return Completion(model=answer.model, choices={0: choice}, usage=answer.usage, chunks=answer.events,
                      done=answer.done, errors=errors, end=_END_NAMES.get(protocol.name, "its end"))


_END_NAMES = {"anthropic": "message_stop", "responses": "response.completed", "ollama": '"done": true'}


def other_protocol(metadata: Metadata, data: bytes) -> StreamProtocol | None:
    """The protocol of a stream of Anthropic Messages, Responses or Ollama, by the flow's request or the data."""
    flow = metadata.flow
    if isinstance(flow, http.HTTPFlow):
        try:
            payload = json.loads(flow.request.content or b"{}")
        except ValueError:
            payload = {}
        protocol = protocol_for(flow.request.path, payload if isinstance(payload, dict) else {})
        if protocol is not None:
            return protocol if protocol.api != "openai" else None
    head = data[:4096]
    if b"event: message_start" in head:
        return PROTOCOLS["anthropic"]
    if b"event: response.created" in head:
        return PROTOCOLS["responses"]
    if metadata.content_type == "application/x-ndjson" and b'"done":' in head:
        return PROTOCOLS["ollama"]
    return None


def _add_chunk(completion: Completion, chunk: dict) -> None:
    completion.model = chunk.get("model") or completion.model
    completion.usage = chunk.get("usage") or completion.usage
    for raw in chunk.get("choices") or []:
        choice = completion.choice(raw.get("index", 0))
        delta = raw.get("delta") or {}
        _append(choice.content, delta.get("content"))
        _append(choice.reasoning, delta.get("reasoning_content") or delta.get("reasoning"))
        choice.finish_reason = raw.get("finish_reason") or choice.finish_reason


def assemble_json(body: bytes) -> Completion:
    """A whole chat.completion answer (or an error object). ValueError if it is not one."""
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ValueError("not a chat completion")
    completion = Completion(model=payload.get("model"), usage=payload.get("usage"))
    if payload.get("error") is not None:
        error = payload["error"]
        completion.errors.append(str(error.get("message", error)) if isinstance(error, dict) else str(error))
    for raw in payload.get("choices") or []:
        choice = completion.choice(raw.get("index", 0))
        message = raw.get("message") or {}
        _append(choice.content, message.get("content"))
        _append(choice.reasoning, message.get("reasoning_content") or message.get("reasoning"))
        choice.finish_reason = raw.get("finish_reason")
    return completion


def _append(parts: list[str], text) -> None:
    if isinstance(text, str) and text:
        parts.append(text)


# -- what llm-ha (or the flow's timestamps) says about the answer's timing

def llm_ha_record(flow) -> dict:
    """What llm-ha recorded on the flow (`flow.metadata["llm_ha"]`); empty if it did not handle it."""
    meta = getattr(flow, "metadata", {}).get(META_KEY) if flow is not None else None
    return meta if isinstance(meta, dict) else {}


def first_chunk_text(flow) -> str | None:
    """`284 ms for the client; fallback http://... took 83 ms (attempt 2 of 2)`, or an approximation."""
    record = llm_ha_record(flow)
    attempts = record.get("attempts") or []
    first = _first_answering(record)
    if first is not None and first.get("ttfb_s") is not None:
        start = getattr(getattr(flow, "request", None), "timestamp_start", None) or attempts[0]["start"]
        waited = first["start"] + first["ttfb_s"] - start
        return (f"{waited * 1000:.0f} ms for the client; {first['upstream']} {first['node']} took "
                f"{first['ttfb_s'] * 1000:.0f} ms (attempt {attempts.index(first) + 1} of {len(attempts)})")
    if isinstance(flow, http.HTTPFlow) and flow.response and flow.response.timestamp_start:
        waited = flow.response.timestamp_start - flow.request.timestamp_start
        return f"{waited * 1000:.0f} ms (approximated: request start to response headers)"
    return None


def _first_answering(record: dict) -> dict | None:
    """The attempt whose first byte the client got: the last one, unless a stream broke and was resumed."""
    attempts = record.get("attempts") or []
    if not attempts or record.get("upstream") == "none":
        return None
    return next((a for a in attempts if a.get("events") is not None), attempts[-1])


ATTEMPT_COLUMNS = ("#", "upstream", "node", "outcome", "status", "TTFB ms", "duration ms")


def attempts_table(attempts: list[dict]) -> list[str]:
    """One row per upstream attempt, in the order they were made."""
    rows = [ATTEMPT_COLUMNS] + [_attempt_row(index, a) for index, a in enumerate(attempts, 1)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(ATTEMPT_COLUMNS))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _attempt_row(index: int, a: dict) -> tuple[str, ...]:
    outcome = str(a.get("outcome") or "-")
    if a.get("events") is not None:
        outcome += f" after {a['events']} events"
    if a.get("resumed"):
        outcome += " (resumed)"
    return (str(index), str(a.get("upstream", "-")), str(a.get("node", "-")), outcome,
            str(a.get("status") or "-"), _ms(a.get("ttfb_s")), _ms(a.get("duration_s")))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


# -- the view

class LlmStreamContentview(Contentview):
    name = "LLM stream"
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        other = other_protocol(metadata, data) if _is_stream(metadata) else None
        if other is not None:
            return render(assemble_protocol(data, other), metadata.flow, streamed=True)
        streamed = _is_event_stream(metadata) or data.lstrip().startswith(b"data:")
        completion = assemble_stream(data) if streamed else assemble_json(data)
        return render(completion, metadata.flow, streamed)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if not data or not isinstance(metadata.http_message, http.Response):
            return -1
        if _is_stream(metadata) and other_protocol(metadata, data) is not None:
            return SSE_PRIORITY
        if _is_event_stream(metadata) and (b"chat.completion.chunk" in data[:4096] or _is_chat_path(metadata)):
            return SSE_PRIORITY
        if metadata.content_type == "application/json" and b'"chat.completion"' in data:
            return JSON_PRIORITY
        return -1


def render(completion: Completion, flow, streamed: bool) -> str:
    lines = [f"model:         {completion.model or '-'}"]
    finish = ", ".join(c.finish_reason or "-" for _, c in sorted(completion.choices.items())) or "-"
    lines.append(f"finish reason: {finish}")
    lines.append(f"usage:         {_usage_text(completion.usage)}")
    if streamed:
        ending = "" if completion.done else f" (no {completion.end}: the stream ended early)"
        lines.append(f"chunks:        {completion.chunks}{ending}")
    first = first_chunk_text(flow)
    if first:
        lines.append(f"{'first chunk:' if streamed else 'first byte:':<15}{first}")
    record = llm_ha_record(flow)
    if record.get("summary"):
        lines.append(f"llm-ha:        {record['summary']}")
    if record.get("attempts"):
        lines += ["attempts:", *attempts_table(record["attempts"])]
    for message in completion.errors:
        lines.append(f"error:         {message}")
    for index, choice in sorted(completion.choices.items()):
        lines += _choice_text(index, choice, several=len(completion.choices) > 1)
    return "\n".join(lines) + "\n"


def _choice_text(index: int, choice: Choice, several: bool) -> list[str]:
    suffix = f" (choice {index})" if several else ""
    out = []
    if choice.reasoning:
        out += ["", f"--- reasoning{suffix} ---", "".join(choice.reasoning)]
    out += ["", f"--- content{suffix} ---", "".join(choice.content)]
    return out


def _usage_text(usage: dict | None) -> str:
    if not usage:
        return "-"
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    return ", ".join(f"{name.removesuffix('_tokens')} {usage[name]}" for name in names if name in usage) or "-"


def _is_event_stream(metadata: Metadata) -> bool:
    return metadata.content_type == "text/event-stream"


def _is_stream(metadata: Metadata) -> bool:
    return metadata.content_type in ("text/event-stream", "application/x-ndjson")


def _is_chat_path(metadata: Metadata) -> bool:
    flow = metadata.flow
    return isinstance(flow, http.HTTPFlow) and flow.request.path.split("?")[0].endswith("/chat/completions")


llm_stream_view = LlmStreamContentview()


def remove_view(view: Contentview = llm_stream_view) -> None:
    """Unregister the view. mitmproxy 12 has no public call for this (`contentviews.remove` is a
    deprecated no-op), so this drops it from the registry by name, if it is still the one registered."""
    registry = contentviews.registry
    by_name = getattr(registry, "_by_name", None)
    if isinstance(by_name, dict) and by_name.get(view.name.lower()) is view:
        del by_name[view.name.lower()]
