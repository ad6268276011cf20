"""The simulator's other APIs on the wire: Anthropic Messages, OpenAI Responses, Ollama's native API.

Each `Wire` turns a request into the chat body the simulator's generation understands (`to_chat`), and
renders what the engine produces as that API does: the events a stream sends before its first token
(`preamble`), one event per token, the events that end it, a whole (non-streaming) answer, an error
inside the stream and an error as an HTTP answer. Field names and event order follow each API's
documentation and what vLLM/SGLang/Ollama send.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

SSE = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
NDJSON = [("content-type", "application/x-ndjson")]
JSON = [("content-type", "application/json")]


class WireError(ValueError):
    """A request the API refuses (400)."""


def _event(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class Wire:
    name = "base"
    headers = SSE

    def __init__(self, model: str, body: dict) -> None:
        self.model = model
        self.body = body
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.sent: list[str] = []

    @staticmethod
    def to_chat(body: dict) -> dict:
        raise NotImplementedError

    def preamble(self, prompt_tokens: int) -> bytes:
        return b""

    def token(self, text: str) -> bytes:
        raise NotImplementedError

    def end(self, finish: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        raise NotImplementedError

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        raise NotImplementedError

    def in_band_error(self, message: str) -> bytes:
        raise NotImplementedError

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        raise NotImplementedError


class AnthropicWire(Wire):
    """`POST /v1/messages`: message_start, content_block_start, ping, content_block_delta..., message_stop."""

    name = "anthropic"
    STOP = {"stop": "end_turn", "length": "max_tokens"}
    ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}

    @staticmethod
    def to_chat(body: dict) -> dict:
        if not isinstance(body.get("max_tokens"), int):
            raise WireError("max_tokens: Field required")
        messages = [{"role": m.get("role"), "content": _text(m.get("content"))}
                    for m in body.get("messages") or [] if isinstance(m, dict)]
        system = body.get("system")
        if system:
            messages.insert(0, {"role": "system", "content": _text(system)})
        return {"messages": messages, "max_tokens": body["max_tokens"], "stream": body.get("stream") is True}

    def preamble(self, prompt_tokens: int) -> bytes:
        message = {"id": f"msg_sim{self.id}", "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}
        return (_event("message_start", {"type": "message_start", "message": message})
                + _event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}})
                + _event("ping", {"type": "ping"}))

    def token(self, text: str) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": text}})

    def end(self, finish: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": self.STOP[finish], "stop_sequence": None},
                                           "usage": {"output_tokens": completion_tokens}})
                + _event("message_stop", {"type": "message_stop"}))

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": f"msg_sim{self.id}", "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": text}], "stop_reason": self.STOP[finish], "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}}

    def in_band_error(self, message: str) -> bytes:
        return _event("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}})

    @classmethod
    def error_body(cls, status: int, message: str) -> dict:
        kind = cls.ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}


class ResponsesWire(Wire):
    """`POST /v1/responses`: response.created, response.in_progress, ..., response.output_text.delta...,
    response.completed (or response.incomplete at max_output_tokens)."""

    name = "responses"

    @staticmethod
    def to_chat(body: dict) -> dict:
        given = body.get("input")
        if isinstance(given, str):
            messages = [{"role": "user", "content": given}]
        elif isinstance(given, list):
            messages = [{"role": m.get("role", "user"), "content": _text(m.get("content"))}
                        for m in given if isinstance(m, dict)]
        else:
            raise WireError("input: must be a string or a list of items")
        if body.get("instructions"):
            messages.insert(0, {"role": "system", "content": str(body["instructions"])})
        chat: dict = {"messages": messages, "stream": body.get("stream") is True}
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        return chat

    def __init__(self, model: str, body: dict) -> None:
        super().__init__(model, body)
        self.sequence = 0
        self.item_id = f"msg_sim{self.id}"

    def _send(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _event(kind, obj)

    def _response(self, status: str, text: str | None, usage: dict | None, finish: str | None = None) -> dict:
        output = [] if text is None else [self._item("completed", text)]
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        return {"id": f"resp_sim{self.id}", "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": incomplete, "instructions": self.body.get("instructions"),
                "max_output_tokens": self.body.get("max_output_tokens"), "model": self.model, "output": output,
                "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "metadata": {}, "usage": usage}

    def _item(self, status: str, text: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def preamble(self, prompt_tokens: int) -> bytes:
        response = self._response("in_progress", None, None)
        return (self._send("response.created", response=response)
                + self._send("response.in_progress", response=response)
                + self._send("response.output_item.added", output_index=0, item=self._item("in_progress", ""))
                + self._send("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                             part={"type": "output_text", "text": "", "annotations": []}))

    def token(self, text: str) -> bytes:
        self.sent.append(text)
        return self._send("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def end(self, finish: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        text = "".join(self.sent)
        part = {"type": "output_text", "text": text, "annotations": []}
        status = "incomplete" if finish == "length" else "completed"
        response = self._response(status, text, self._usage(prompt_tokens, completion_tokens), finish)
        return (self._send("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                           text=text, logprobs=[])
                + self._send("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                             part=part)
                + self._send("response.output_item.done", output_index=0, item=self._item("completed", text))
                + self._send(f"response.{status}", response=response))

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        status = "incomplete" if finish == "length" else "completed"
        return self._response(status, text, self._usage(prompt_tokens, completion_tokens), finish)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + completion_tokens}

    def in_band_error(self, message: str) -> bytes:
        return self._send("error", code="server_error", message=message, param=None)

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                          "param": None, "code": None}}


class OllamaWire(Wire):
    """`POST /api/chat` and `/api/generate`: newline-delimited JSON, the last line `"done": true`."""

    name = "ollama"
    headers = NDJSON

    def __init__(self, model: str, body: dict, generate: bool = False) -> None:
        super().__init__(model, body)
        self.generate = generate

    @staticmethod
    def to_chat(body: dict, generate: bool = False) -> dict:
        if generate:
            messages = [{"role": "user", "content": str(body.get("prompt", ""))}]
        else:
            messages = [{"role": m.get("role"), "content": _text(m.get("content"))}
                        for m in body.get("messages") or [] if isinstance(m, dict)]
        chat: dict = {"messages": messages, "stream": body.get("stream", True) is not False}
        options = body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int) and options["num_predict"] > 0:
            chat["max_tokens"] = options["num_predict"]
        return chat

    def _now(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

    def _part(self, text: str) -> dict:
        if self.generate:
            return {"response": text}
        return {"message": {"role": "assistant", "content": text}}

    def token(self, text: str) -> bytes:
        return _line({"model": self.model, "created_at": self._now(), **self._part(text), "done": False})

    def _final(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"model": self.model, "created_at": self._now(), **self._part(text), "done": True,
                "done_reason": finish, "total_duration": 0, "load_duration": 0, "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 0, "eval_count": completion_tokens, "eval_duration": 0}

    def end(self, finish: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        return _line(self._final("", finish, prompt_tokens, completion_tokens))

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._final(text, finish, prompt_tokens, completion_tokens)

    def in_band_error(self, message: str) -> bytes:
        return _line({"error": message})

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        return {"error": message}


EMBEDDINGS_PATH = "/v1/embeddings"
WIRE_PATHS: dict[str, type[Wire]] = {"/v1/messages": AnthropicWire, "/v1/responses": ResponsesWire, "/api/chat": OllamaWire,
              "/api/generate": OllamaWire}


def wire_for(path: str, model: str, body: dict) -> tuple[Wire, dict]:
    """The wire for `path` and the request as a chat body; WireError when the API would refuse it."""
    cls = WIRE_PATHS[path]
    if cls is OllamaWire:
        generate = path == "/api/generate"
        return OllamaWire(model, body, generate), OllamaWire.to_chat(body, generate)
    return cls(model, body), cls.to_chat(body)


def embeddings(model: str, body: dict) -> dict:
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given if isinstance(given, list) else None
    if not inputs:
        raise WireError("input: must be a string or a non-empty list")
    data = [{"object": "embedding", "index": i, "embedding": [((hash(str(x)) >> s) % 1000) / 1000 for s in range(8)]}
            for i, x in enumerate(inputs)]
    tokens = sum(max(1, len(str(x)) // 4) for x in inputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
