"""The "LLM stream" content view: an OpenAI-style chat completion, assembled, for mitmproxy's console and web UI.

For a streamed answer (`text/event-stream` of `chat.completion.chunk` events) it shows the assistant
message put back together (content, and `reasoning_content` when the model sends it), the model, the
finish reason, the usage, the number of chunks, the time to the first chunk, and llm-ha's attempt
summary. A plain `chat.completion` JSON answer gets the same, without chunks.

The time to the first chunk is the winning attempt's `ttfb_s` from llm-ha's flow metadata when the
flow went through llm-ha; otherwise it is approximated from the flow's timestamps (request start to
response headers), since mitmproxy keeps no per-chunk times.

Registering (the addon does it): `contentviews.add(llm_stream_view)` in `load`, `remove_view()` in `done`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

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
    done: bool = False  # the stream ended with `data: [DONE]`
    errors: list[str] = field(default_factory=list)

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

def first_chunk_time(flow) -> tuple[float | None, str]:
    """(seconds to the first chunk, where the number comes from)."""
    meta = getattr(flow, "metadata", {}).get(META_KEY) if flow is not None else None
    attempts = meta.get("attempts") if isinstance(meta, dict) else None
    if attempts:
        winner = next((a for a in reversed(attempts) if a.get("outcome") in ("ok", "stream_cut")), attempts[-1])
        if winner.get("ttfb_s") is not None:
            return winner["ttfb_s"], f"llm-ha, {winner.get('upstream')} {winner.get('node')}"
    if isinstance(flow, http.HTTPFlow) and flow.response and flow.response.timestamp_start:
        return (flow.response.timestamp_start - flow.request.timestamp_start,
                "approximated: request start to response headers")
    return None, ""


def attempt_summary(flow) -> str | None:
    meta = getattr(flow, "metadata", {}).get(META_KEY) if flow is not None else None
    return meta.get("summary") if isinstance(meta, dict) else None


# -- the view

class LlmStreamContentview(Contentview):
    name = "LLM stream"
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        streamed = _is_event_stream(metadata) or data.lstrip().startswith(b"data:")
        completion = assemble_stream(data) if streamed else assemble_json(data)
        return render(completion, metadata.flow, streamed)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if not data or not isinstance(metadata.http_message, http.Response):
            return -1
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
        ending = "" if completion.done else " (no [DONE]: the stream ended early)"
        lines.append(f"chunks:        {completion.chunks}{ending}")
    ttfb, source = first_chunk_time(flow)
    if ttfb is not None:
        label = "first chunk:  " if streamed else "first byte:   "
        lines.append(f"{label} {ttfb * 1000:.0f} ms ({source})")
    summary = attempt_summary(flow)
    if summary:
        lines.append(f"llm-ha:        {summary}")
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
