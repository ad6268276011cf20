"""Raw asyncio upstreams that misbehave in ways the simulator cannot: hang without headers, gzip despite
`accept-encoding: identity`, answer a WebSocket upgrade, serve an HTML page, cut a JSON body short.

    with FakeUpstream(hang) as primary:
        ...  # primary.url, primary.requests (what it was sent), primary.connections

Each runs its own event loop in a thread, so a test can drive it with blocking clients. A behaviour is
`async def behaviour(request, writer)`; it writes what it likes and returns (the connection is then
closed) or never returns (a hang, ended by `stop`).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    reader: asyncio.StreamReader | None = field(default=None, repr=False)  # what follows (a WebSocket's frames)

    @property
    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}


Behaviour = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class FakeUpstream:
    behaviour: Behaviour
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake upstream did not start")

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        tasks: set[asyncio.Task] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            tasks.add(task)
            self.connections += 1
            try:
                await self._handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the peer left, or `stop`
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        await self._stop_event.wait()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: one request after the other until the behaviour closes or the peer leaves
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(method, path, headers, body, reader)
            self.requests.append(request)
            await self.behaviour(request, writer)
            await writer.drain()
            if writer.is_closing() or headers.get("upgrade"):
                return


# -- writing answers

def head(status: int, headers: list[tuple[str, str]], reason: str = "") -> bytes:
    reason = reason or {101: "Switching Protocols", 200: "OK", 429: "Too Many Requests"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def respond(writer: asyncio.StreamWriter, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
    writer.write(head(status, [*headers, ("content-length", str(len(body)))]) + body)


def chat_completion(model: str, content: str) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def chat_stream(model: str, words: list[str], usage: bool = True) -> bytes:
    def event(choices: list, **extra) -> bytes:
        obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
               "choices": choices, **extra}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    events = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    events += [event([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in words]
    events.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage:
        events.append(event([], usage={"prompt_tokens": 1, "completion_tokens": len(words),
                                       "total_tokens": 1 + len(words)}))
    return b"".join(events) + b"data: [DONE]\n\n"


# -- behaviours

async def hang(request: Request, writer: asyncio.StreamWriter) -> None:
    """Accept, read the request, never answer."""
    await asyncio.Event().wait()


def answers_chat(model: str = "fake-model", words: tuple[str, ...] = ("Hello", " there")) -> Behaviour:
    """A well-behaved OpenAI-compatible server: streams when asked, else one JSON answer."""

    async def behaviour(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.json.get("stream") is True:
            body = chat_stream(model, list(words), usage=bool(request.json.get("stream_options") or {}))
            respond(writer, 200, body, [("content-type", "text/event-stream")])
        else:
            respond(writer, 200, json.dumps(chat_completion(model, "".join(words))).encode(),
                    [("content-type", "application/json")])

    return behaviour


def gzips(model: str = "gzip-model") -> Behaviour:
    """Compresses every answer, whatever `accept-encoding` says: SSE in gzip chunks, JSON in one gzip body."""

    async def behaviour(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.json.get("stream") is True:
            compressed = gzip.compress(chat_stream(model, ["Hello", " there"]))
            writer.write(head(200, [("content-type", "text/event-stream"), ("content-encoding", "gzip"),
                                    ("transfer-encoding", "chunked")]))
            for i in range(0, len(compressed), 40):  # several chunks, as a server flushing its stream would
                piece = compressed[i:i + 40]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        else:
            body = gzip.compress(json.dumps(chat_completion(model, "Hello there")).encode())
            respond(writer, 200, body, [("content-type", "application/json"), ("content-encoding", "gzip")])

    return behaviour


def rate_limited(retry_after: str, retry_after_ms: str | None = None) -> Behaviour:
    async def behaviour(request: Request, writer: asyncio.StreamWriter) -> None:
        headers = [("content-type", "application/json"), ("retry-after", retry_after)]
        if retry_after_ms is not None:
            headers.append(("retry-after-ms", retry_after_ms))
        body = {"error": {"message": "rate limited", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
        respond(writer, 429, json.dumps(body).encode(), headers)

    return behaviour


async def html_page(request: Request, writer: asyncio.StreamWriter) -> None:
    """What a captive portal or a misrouted load balancer answers: 200 and a web page."""
    respond(writer, 200, b"<html><body><h1>Welcome</h1></body></html>", [("content-type", "text/html; charset=utf-8")])


async def json_error_object(request: Request, writer: asyncio.StreamWriter) -> None:
    """A 200 whose JSON body is an error object, whether a stream was asked or not."""
    body = {"error": {"message": "model overloaded", "type": "server_error", "code": "overloaded"}}
    respond(writer, 200, json.dumps(body).encode(), [("content-type", "application/json")])


async def truncated_json(request: Request, writer: asyncio.StreamWriter) -> None:
    """A 200 JSON answer without a length, cut short by closing the connection."""
    writer.write(head(200, [("content-type", "application/json"), ("connection", "close")]))
    writer.write(b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"index": 0, "message": {"ro')
    await writer.drain()
    writer.close()


async def websocket_echo(request: Request, writer: asyncio.StreamWriter) -> None:
    """Accepts a WebSocket upgrade and echoes the client's first text frame (unmasked, as a server sends)."""
    key = request.headers.get("sec-websocket-key", "")
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    writer.write(head(101, [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept)]))
    await writer.drain()
    _, second = await request.reader.readexactly(2)  # FIN + opcode, then MASK + length
    mask = await request.reader.readexactly(4) if second & 0x80 else b"\0\0\0\0"
    payload = await request.reader.readexactly(second & 0x7F)
    writer.write(websocket_frame(bytes(b ^ mask[i % 4] for i, b in enumerate(payload)).decode()))
    await writer.drain()
    await request.reader.read()  # until the client closes


def websocket_frame(text: str, mask: bytes | None = None) -> bytes:
    """One final text frame; masked (as a client must send) when `mask` is given. Payloads < 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    if mask is None:
        return bytes([0x81, len(payload)]) + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked
