"""An OpenAI-compatible LLM server simulator with the physics of an overloaded GPU, and fault switches.

Run `python -m llmsim.server --help`. It serves `POST /v1/chat/completions` and the legacy
`POST /v1/completions` (streaming and not) and `GET /v1/models` on 127.0.0.1, prints one JSON line
with its URLs on stdout, and serves its control endpoints (`GET /_sim/stats`, `GET|POST /_sim/faults`,
`POST /_sim/crash`) on a second port, which stays reachable while the API port refuses connections.
It also speaks Anthropic Messages (`POST /v1/messages`), OpenAI Responses (`POST /v1/responses`),
Ollama's native API (`POST /api/chat`, `/api/generate`, newline-delimited JSON) and `POST
/v1/embeddings`, each on its own wire (`wires.py`: field names, event order, the opening events sent
before the first token, in-band errors, error bodies), with the same answers, physics and fault
switches.

The answers
-----------
An answer is a deterministic function of the request, the same in every simulator process and preset
(so a primary and a fallback say the same), and `expected_answer(body)` computes it for tests. The
model says an endless sequence of tokens, one word of WORDS each, token i chosen by
sha256(seed, i): a chat answer starts with a bare word and goes on with " word" tokens; every token
of a legacy completion is " word". The seed is a sha256 of the conversation (each message's role and
text) before any final assistant message, or of the completion prompt. An answer has max_tokens (or
max_completion_tokens) tokens with finish_reason "length"; without either, it ends naturally ("stop")
after `--default-max-tokens` tokens counted from its start, prefill included. One token is one SSE
event.

Continuing a partial answer (prefill). A chat request whose last message is `{"role": "assistant",
"content": P}` continues that message: P must be the first k tokens of the answer to the conversation
before it (whole tokens); the simulator then generates tokens k, k+1, ... (at most max_tokens of
them), streams only the new text (the first chunk still carries `role: assistant`, as vLLM does), and
counts the k prefill tokens as prompt tokens, only the new ones as completion tokens. If P is not such
a prefix, it logs that and answers afresh, from token 0. Three forms of prefill exist: plain (a final
assistant message is always continued, as Anthropic does), vLLM's (`continue_final_message: true,
add_generation_prompt: false` in the body) and DeepSeek's (`"prefix": true` on the message); the
`prefill` switch below says which are accepted. A legacy completion is continued by sending the
original prompt plus the partial answer as the prompt: the seed comes from the prompt without the
longest run of trailing " word" tokens that is the beginning of that shorter prompt's answer (so a
prompt that merely ends in such words may, rarely, count as a continuation; the answer is still a
function of the prompt alone).

The physics (preset `primary`, the default)
-------------------------------------------
Modelled on the source document's set-up: DeepSeek-R1-Distill-Qwen-7B, fp16, on one NVIDIA A10
(24 GB GDDR6, 600 GB/s, 125 TFLOPS fp16 tensor peak).

* One engine loop plays the GPU. Each iteration first admits waiting requests (FIFO) into the running
  batch, up to `--max-batch` (16, the deployment's concurrency cap), and prefills them, which stalls
  the batch; then runs one decode step that gives every running sequence one token. Requests beyond
  the batch wait, so time to first token grows with load. The response (status line and headers)
  goes out together with the first token, so time to first byte equals time to first token.
* Decode step: `token_time * (1 + batch_alpha * (batch - 1))` with token_time = 25 ms: decoding is
  memory-bound and every step reads all weights, 7.62 G params * 2 B = 15.2 GB, at 600 GB/s = 25 ms
  (about 40 tok/s for one sequence, as measured for 7B fp16 on an A10). batch_alpha = 0.06 makes a
  step of 16 sequences 47.5 ms (about 340 tok/s in aggregate). That is steeper than bandwidth
  arithmetic alone (weights are read once per step whatever the batch); it stands for attention over
  long reasoning contexts, sampling and the serving loop's overheads, and keeps the queueing visible
  at demo request sizes.
* Prefill: `prefill_time + prefill_per_token * prompt_tokens` = 15 ms + 0.25 ms/token: a prompt token
  costs 2 * 7.6 G = 15 GFLOP, and the A10 sustains about 60 TFLOPS of its 125 peak.
* Memory: the limit is 23,028 MiB (what an A10 reports usable); weights (14,534 MiB) plus CUDA
  context, cuBLAS workspace and activations make a base of 16,000 MiB. The model (Qwen2-7B shape: 28
  layers, 4 KV heads of dim 128) needs 2 * 28 * 4 * 128 * 2 B = 56 KiB of KV cache per token. Every
  request the server has accepted, queued or running, holds a reservation of 140 MiB, the KV cache for
  the context it may reach (a 512-token prompt plus a 2,048-token reasoning answer), or its actual KV
  size (prompt + tokens generated so far) when that is larger. So 50 requests fit; accepting the 51st,
  e.g. 16 running and 35 queued, overcommits the GPU and the server crashes: every open connection is
  cut with a TCP reset, the port refuses connections for `--restart-time` (180 s, the source
  document's figure), then the server listens again, empty.

Sizes for the demo: a 64-token answer takes about 64 steps, so the server sustains about 5 requests/s
of those; at 2 requests/s time to first token is ~50 ms, under a 12 requests/s spike the queue passes
35 within seconds and the server crashes, unless a proxy sheds the load first.

Preset `fallback`: a cloud provider (default model `qwen-plus`): 50 ms to the first token, 10 ms per
token, a batch of 10,000, no memory limit, and requests admitted together prefill side by side (many
GPUs), so it never queues and never crashes. `--no-physics`: an
ideal server, every token at once, no limits.

`--time-scale F` multiplies every duration, the physics, the restart time and the durations of the
fault switches (see below): with 0.1 a 180 s restart takes 18 s.

Fault switches (command line flags, or `POST /_sim/faults` with a JSON object of the same names)
--------------------------------------------------------------------------------------------------
* `error_rate`: the fraction of API requests answered 500.
* `status`: answer every API request with this HTTP status and an OpenAI-style error (0 or null: off);
  `status_code` sets that error's `code` (e.g. `context_length_exceeded`), `retry_after` adds a
  `Retry-After: <seconds>` header to it.
* `in_band_error`: streaming requests get a 200 whose first SSE event is `data: {"error": {...}}`;
  non-streaming ones a 200 whose body is that error object.
* `first_token_delay`: seconds a request waits before it joins the queue, on top of the physics.
* `reset_after_chunks`: cut the connection with a TCP reset after this many SSE events (0: before
  anything is sent; a non-streaming request is cut instead of answered).
* `refuse`: stop listening and close idle keep-alive connections, so connections are refused;
  requests in progress finish. `false` listens again on the same port.
* `slow_start`: seconds after each (re)start during which the server warms up. With w falling
  linearly from 1 to 0 across the window, each request's first token comes w * 1 s later and every
  prefill and decode step takes (1 + 4 w) times as long. It counts from the last start or crash
  restart, so setting it at run time affects only what is left of the current window.
* `stall_after_chunks` with `stall_seconds` (default 60): after this many content events (0: before
  anything is sent) a stream goes silent for stall_seconds, the connection open, then goes on with
  what was generated meanwhile. Once per request; streams only.
* `stall_keepalive`: during a stall, send the SSE comment `: keep-alive` every second (and the
  response headers first if none went out), like a server whose stream is alive but makes no progress.
* `no_done`: `true`: a stream ends, with a clean end of the HTTP message, right after its last content
  event: no finish_reason chunk, no usage chunk, no `data: [DONE]`, like a server that died gracefully.
  An integer N: the same after N content events (0: a 200 with an empty body), a clean end mid-answer.
  Streams only.
* `prefill`: which final assistant messages are continued: `any` (the default; every form), `vllm`
  (only with the vLLM flags; anything else gets vLLM's 400 `BadRequestError`), `deepseek` (only with
  `"prefix": true`), `reject` (a 400 `invalid_request_error` with code `prefill_unsupported` for any
  final assistant message).

The durations of the switches (first_token_delay, slow_start, stall_seconds, the keep-alive second)
are multiplied by `--time-scale`. `GET /_sim/stats` counts, besides requests and outcomes, `stalls`,
`prefill_continuations` (prefills continued, chat or legacy), `prefill_mismatches` (answered afresh),
`prefill_refused` (400s by the `prefill` switch) and `ended_without_done` (streams cut short by no_done).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import random
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from llmha.proxy.httpserver import HttpServer, Request, Responder
from llmsim.wires import EMBEDDINGS_PATH, WIRE_PATHS, Wire, WireError, embeddings, wire_for

LOG = logging.getLogger("llmsim")
HOST = "127.0.0.1"

WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua"]  # noqa: E501
WORD_SET = frozenset(WORDS)

SLOW_START_MAX_DELAY = 1.0  # s added to the first token at the very start of a slow_start window
SLOW_START_MAX_SLOWDOWN = 4.0  # physics take up to (1 + this) times as long at that moment
KEEPALIVE_INTERVAL = 1.0  # s between keep-alive comments during a stall
KEEPALIVE = b": keep-alive\n\n"
PREFILL_MODES = ("any", "vllm", "deepseek", "reject")
CHAT_PATH, TEXT_PATH = "/v1/chat/completions", "/v1/completions"
DEFAULT_MAX_TOKENS, MAX_OUTPUT_TOKENS = 32, 4096
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


@dataclass(frozen=True)
class Physics:
    """Timings in (unscaled) seconds, memory in MiB; see the module docstring for the numbers."""

    max_batch: int = 16
    token_time: float = 0.025
    batch_alpha: float = 0.06
    prefill_time: float = 0.015
    prefill_per_token: float = 0.00025
    memory_limit_mb: float = 23028.0
    base_memory_mb: float = 16000.0
    request_memory_mb: float = 140.0
    kv_per_token_kb: float = 56.0
    restart_time: float = 180.0
    parallel_prefill: bool = False  # many GPUs (a cloud provider): admitted requests prefill side by side

    def step_time(self, batch: int) -> float:
        return self.token_time * (1 + self.batch_alpha * (batch - 1))

    def prefill(self, prompt_tokens: int) -> float:
        return self.prefill_time + self.prefill_per_token * prompt_tokens

    def sequence_memory_mb(self, context_tokens: int) -> float:
        return max(self.request_memory_mb, self.kv_per_token_kb * context_tokens / 1024)


PRIMARY = Physics()
FALLBACK = Physics(
    max_batch=10_000, token_time=0.01, batch_alpha=0.0, prefill_time=0.05, prefill_per_token=0.0,
    memory_limit_mb=math.inf, base_memory_mb=0.0, request_memory_mb=0.0, kv_per_token_kb=0.0,
    restart_time=0.0, parallel_prefill=True,
)
IDEAL = replace(FALLBACK, token_time=0.0, prefill_time=0.0)
PRESETS = {
    "primary": ("DeepSeek-R1-Distill-Qwen-7B", PRIMARY),
    "fallback": ("qwen-plus", FALLBACK),
}


@dataclass
class Faults:
    error_rate: float = 0.0
    status: int | None = None
    in_band_error: bool = False
    first_token_delay: float = 0.0
    reset_after_chunks: int | None = None
    refuse: bool = False
    slow_start: float = 0.0
    stall_after_chunks: int | None = None
    stall_seconds: float = 60.0
    stall_keepalive: bool = False
    no_done: bool | int = False
    prefill: str = "any"
    retry_after: float | None = None  # seconds, sent as `Retry-After` with the `status` fault's answers
    status_code: str | None = None  # the error `code` of the `status` fault's answers (e.g. context_length_exceeded)

    def updated(self, changes: dict[str, Any]) -> Faults:
        """A copy with `changes` applied; ValueError names the first bad key or value."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(sorted(known))}")
        new = replace(self, **changes)
        new._validate()
        return new

    def _validate(self) -> None:
        def number(name: str, value: Any, low: float, high: float = math.inf) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")

        number("error_rate", self.error_rate, 0.0, 1.0)
        number("first_token_delay", self.first_token_delay, 0.0)
        number("slow_start", self.slow_start, 0.0)
        number("stall_seconds", self.stall_seconds, 0.0)
        if self.status == 0:
            self.status = None
        if self.status is not None:
            if isinstance(self.status, bool) or not isinstance(self.status, int) or not 400 <= self.status <= 599:
                raise ValueError(f"status must be an HTTP error status (400..599), 0 or null, got {self.status!r}")
        for name in ("reset_after_chunks", "stall_after_chunks"):
            value = getattr(self, name)
            if value is not None and not _count(value):
                raise ValueError(f"{name} must be an integer >= 0 or null, got {value!r}")
        for name in ("in_band_error", "refuse", "stall_keepalive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.no_done, bool) and not _count(self.no_done):
            raise ValueError(f"no_done must be true, false or an integer >= 0, got {self.no_done!r}")
        if self.retry_after is not None:
            number("retry_after", self.retry_after, 0.0)
        if self.status_code is not None and not isinstance(self.status_code, str):
            raise ValueError(f"status_code must be a string or null, got {self.status_code!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}")

    def ends_without_done(self, sent: int, at_end: bool) -> bool:
        """no_done: end the stream now, cleanly but without its finish chunk and [DONE]?"""
        if isinstance(self.no_done, bool):
            return self.no_done and at_end
        return at_end or sent >= self.no_done


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Clock:
    """Sleeps simulated seconds, times the time scale."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def real(self, seconds: float) -> float:
        return seconds * self.scale

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds * self.scale))


# What a sequence's token queue carries besides token indices.
DONE, CANCELLED, CUT = "done", "cancelled", "cut"


class Sequence:
    """One request's generation: the engine puts token indices, then DONE, into `tokens`."""

    _ids = itertools.count(1)

    def __init__(self, prompt_tokens: int, max_tokens: int) -> None:
        self.id = next(self._ids)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.generated = 0
        self.state = "new"  # new, queued, running, done, cancelled, cut
        self.tokens: asyncio.Queue[int | str] = asyncio.Queue()
        self.cut_by_server = False  # the server cut it (crash or reset fault): not a client disconnect
        self.client_left = False
        self.delivered = False  # the whole answer was written

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "cut")

    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated


class Engine:
    """The GPU: a FIFO queue, a running batch, one token per running sequence per step, memory."""

    def __init__(self, physics: Physics, clock: Clock, slowdown, on_oom) -> None:
        self.physics = physics
        self.clock = clock
        self.slowdown = slowdown  # () -> factor >= 1 multiplying step and prefill times
        self.on_oom = on_oom  # () -> None, called when memory passes the limit
        self.queue: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.peak_batch = 0
        self.peak_queue = 0
        self._wake = asyncio.Event()

    # -- accounting
    def memory_used_mb(self) -> float:
        held = itertools.chain(self.queue, self.running)
        return self.physics.base_memory_mb + sum(self.physics.sequence_memory_mb(s.context_tokens()) for s in held)

    def _check_memory(self) -> None:
        if self.memory_used_mb() > self.physics.memory_limit_mb:
            self.on_oom()

    # -- called by request handlers
    def submit(self, seq: Sequence) -> None:
        seq.state = "queued"
        self.queue.append(seq)
        self.peak_queue = max(self.peak_queue, len(self.queue))
        self._wake.set()
        self._check_memory()

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for `seq` and free its memory; a no-op once it finished."""
        if seq.finished:
            return
        self._remove(seq)
        seq.state = "cancelled"
        seq.tokens.put_nowait(CANCELLED)

    def reset(self) -> None:
        """Drop everything, as a crash does; every sequence gets CUT."""
        for seq in [*self.queue, *self.running]:
            seq.state = "cut"
            seq.cut_by_server = True
            seq.tokens.put_nowait(CUT)
        self.queue.clear()
        self.running.clear()

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        with contextlib.suppress(ValueError):
            self.queue.remove(seq)

    # -- the engine loop
    async def run(self) -> None:
        while True:
            if not self.queue and not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._prefill(self._admit())
            if self.running:
                await self._decode_step()

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.queue and len(self.running) < self.physics.max_batch:
            seq = self.queue.popleft()
            seq.state = "running"
            self.running.append(seq)
            admitted.append(seq)
        self.peak_batch = max(self.peak_batch, len(self.running))
        return admitted

    async def _prefill(self, admitted: list[Sequence]) -> None:
        """Prefill stalls the whole batch; it yields each new sequence's first token."""
        if not admitted:
            return
        costs = [self.physics.prefill(s.prompt_tokens) for s in admitted]
        total = max(costs) if self.physics.parallel_prefill else sum(costs)
        await self.clock.sleep(total * self.slowdown())
        for seq in admitted:
            if seq.state == "running":  # not cancelled or cut meanwhile
                self._emit(seq)

    async def _decode_step(self) -> None:
        await self.clock.sleep(self.physics.step_time(len(self.running)) * self.slowdown())
        for seq in list(self.running):
            self._emit(seq)
        self._check_memory()

    def _emit(self, seq: Sequence) -> None:
        if seq.generated < seq.max_tokens:  # a continuation of a whole answer has nothing to add
            seq.tokens.put_nowait(seq.generated)
            seq.generated += 1
        if seq.generated >= seq.max_tokens:
            self.running.remove(seq)
            seq.state = "done"
            seq.tokens.put_nowait(DONE)


@dataclass
class Stats:
    requests: int = 0
    by_route: Counter = field(default_factory=Counter)  # "POST /v1/chat/completions": requests, probes apart
    by_status: Counter = field(default_factory=Counter)
    completed: int = 0
    client_disconnects: int = 0
    resets: int = 0  # requests the server cut with a reset: crashes and reset_after_chunks
    crashes: int = 0
    crash_times: list[float] = field(default_factory=list)
    stalls: int = 0
    prefill_continuations: int = 0
    prefill_mismatches: int = 0
    prefill_refused: int = 0
    ended_without_done: int = 0
    last_request: dict = field(default_factory=lambda: dict.fromkeys(("method", "path", "model", "authorization",
                                                                      "x-api-key")))


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | int | None = None, kind: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or self.TYPES.get(status, "server_error")
        self.kind = kind or self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after

    def headers(self) -> list[tuple[str, str]]:
        extra = [] if self.retry_after is None else [("retry-after", f"{self.retry_after:g}")]
        return [("content-type", "application/json"), *extra]

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}


class PrefillRefused(ApiError):
    """A final assistant message in a form the `prefill` switch does not accept."""


def message_text(message: Any) -> str:
    """A message's content as text: a string, or the text parts of a list joined by spaces."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def prompt_tokens_of(messages: list) -> int:
    """About four characters a token, plus a few for each message's chat template."""
    return max(1, sum(len(message_text(m)) for m in messages) // 4 + 4 * len(messages))


def text_prompt_tokens(prompt: str) -> int:
    return max(1, len(prompt) // 4)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json_bytes(obj)) + b"\n\n"


# -- answers: a deterministic function of the request (see the module docstring)

@dataclass(frozen=True)
class Answer:
    """The endless token sequence the simulated model says after one prompt."""

    seed: bytes
    space_first: bool = False  # legacy completions: every token, the first too, is " word"

    def token(self, index: int) -> str:
        # A word per position from a hash, not a rotation of WORDS: a splice that drops or repeats
        # a stretch of the answer cannot come out right by accident.
        digest = hashlib.sha256(self.seed + index.to_bytes(8, "big")).digest()
        word = WORDS[int.from_bytes(digest[:8], "big") % len(WORDS)]
        return " " + word if index or self.space_first else word

    def prefix_tokens(self, text: str) -> int | None:
        """k when `text` is exactly the first k tokens; None when it is not."""
        position = index = 0
        while position < len(text):
            token = self.token(index)
            if not text.startswith(token, position):
                return None
            position += len(token)
            index += 1
        return index


def chat_answer(conversation: list) -> Answer:
    canonical = json.dumps([[m.get("role") if isinstance(m, dict) else None, message_text(m)]
                            for m in conversation], separators=(",", ":"))
    return Answer(hashlib.sha256(b"chat\0" + canonical.encode()).digest())


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates


def completion_root(prompt: str) -> tuple[str, Answer, int]:
    """(the prompt without its trailing answer, that shorter prompt's answer, how many of its tokens
    the prompt ends with). The longest trailing answer wins, so a continuation of a continuation
    continues the same answer."""
    hasher = hashlib.sha256(b"text\0")
    hashed = 0
    for start in _trailing_word_starts(prompt):
        hasher.update(_encode(prompt[hashed:start]))
        hashed = start
        answer = Answer(hasher.copy().digest(), space_first=True)
        produced = answer.prefix_tokens(prompt[start:])
        if produced is not None:
            return prompt[:start], answer, produced
    hasher.update(_encode(prompt[hashed:]))
    return prompt, Answer(hasher.digest(), space_first=True), 0


def _trailing_word_starts(prompt: str) -> list[int]:
    """Where each " word" of the prompt's trailing run of them begins, leftmost first."""
    starts, end = [], len(prompt)
    while (space := prompt.rfind(" ", 0, end)) >= 0 and prompt[space + 1:end] in WORD_SET:
        starts.append(space)
        end = space
    return starts[::-1]


# -- requests

class ChatShape:
    """How chat completions look on the wire."""

    id_prefix = "chatcmpl-sim-"
    chunk_object, whole_object = "chat.completion.chunk", "chat.completion"
    extra: ClassVar[dict] = {"system_fingerprint": None}

    @staticmethod
    def token_choice(text: str, opening: bool) -> dict:
        delta = {"role": "assistant", "content": text} if opening else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

    @staticmethod
    def finish_choice(finish_reason: str) -> dict:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    @classmethod
    def opening_choice(cls) -> dict | None:
        """The role delta of an answer with no new tokens (a prefill that was already whole)."""
        return cls.token_choice("", opening=True)

    @staticmethod
    def whole_choice(text: str, finish_reason: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


class TextShape:
    """How legacy completions look on the wire."""

    id_prefix = "cmpl-sim-"
    chunk_object = whole_object = "text_completion"
    extra: ClassVar[dict] = {}

    @staticmethod
    def token_choice(text: str, opening: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}

    @staticmethod
    def finish_choice(finish_reason: str) -> dict:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def opening_choice() -> dict | None:
        return None

    @staticmethod
    def whole_choice(text: str, finish_reason: str) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


@dataclass
class Generation:
    """What the simulator needs from one completion request: what to say, how long, in which shape."""

    shape: ChatShape | TextShape
    stream: bool
    answer: Answer
    first: int  # index in `answer` of the first new token; > 0 when continuing a partial answer
    max_tokens: int  # new tokens
    finish_reason: str
    include_usage: bool
    prompt_tokens: int
    prefill: str | None = None  # "continued", or "mismatch": not a prefix of the answer, answered afresh
    wire: Wire | None = None  # another API than OpenAI's (wires.py): how the answer looks on the wire

    def token(self, new_index: int) -> str:
        return self.answer.token(self.first + new_index)

    def text(self) -> str:
        """The whole new text, uninterrupted."""
        return "".join(self.token(i) for i in range(self.max_tokens))


def parse_chat(body: dict, default_max: int, cap: int, prefill_mode: str = "any") -> Generation:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    conversation, prefill = split_prefill(body, messages, prefill_mode)
    answer = chat_answer(conversation)
    produced = None if prefill is None else answer.prefix_tokens(prefill)
    if produced is None:
        first, prompt_tokens = 0, prompt_tokens_of(messages)
    else:  # the prefill's tokens are prompt tokens
        first, prompt_tokens = produced, prompt_tokens_of(conversation) + produced
    outcome = None if prefill is None else "continued" if produced is not None else "mismatch"
    return _generation(ChatShape(), body, answer, first, default_max, cap, prompt_tokens, outcome)


def split_prefill(body: dict, messages: list, mode: str) -> tuple[list, str | None]:
    """(the conversation, the partial answer in a final assistant message or None); PrefillRefused."""
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return messages, None
    vllm = body.get("continue_final_message") is True and body.get("add_generation_prompt") is False
    deepseek = last.get("prefix") is True
    if mode == "vllm" and not vllm:
        raise PrefillRefused(400, _vllm_refusal(body), code=400, kind="BadRequestError")
    if mode == "reject" or (mode == "deepseek" and not deepseek):
        form = "" if mode == "reject" else " without \"prefix\": true"
        raise PrefillRefused(400, f"this server does not continue a final assistant message{form}",
                             "prefill_unsupported")
    return messages[:-1], message_text(last)


def _vllm_refusal(body: dict) -> str:
    if body.get("continue_final_message") and body.get("add_generation_prompt", True):
        return "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    return ("the last message is from the assistant: set `continue_final_message: true` and "
            "`add_generation_prompt: false` to continue it")


def parse_text(body: dict, default_max: int, cap: int) -> Generation:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list of one string)", "invalid_prompt")
    base, answer, first = completion_root(prompt)
    outcome = "continued" if first else None
    return _generation(TextShape(), body, answer, first, default_max, cap, text_prompt_tokens(base) + first,
                       outcome)


def _generation(shape, body: dict, answer: Answer, first: int, default_max: int, cap: int,
                prompt_tokens: int, prefill: str | None) -> Generation:
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer", "invalid_max_tokens")
    # Without a limit the answer ends naturally, default_max tokens from its start, the prefill included.
    max_tokens = min(asked, cap) if asked is not None else max(0, min(default_max, cap) - first)
    options = body.get("stream_options") or {}
    return Generation(
        shape=shape,
        stream=bool(body.get("stream")),
        answer=answer,
        first=first,
        max_tokens=max_tokens,
        finish_reason="length" if asked is not None else "stop",
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        prompt_tokens=prompt_tokens,
        prefill=prefill,
    )


def expected_generation(body: dict, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                        max_output_tokens: int = MAX_OUTPUT_TOKENS) -> Generation:
    """How a simulator with these limits and prefill `any` answers `body` (chat if it has messages)."""
    if "messages" in body:
        return parse_chat(body, default_max_tokens, max_output_tokens)
    return parse_text(body, default_max_tokens, max_output_tokens)


def expected_answer(body: dict, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                    max_output_tokens: int = MAX_OUTPUT_TOKENS) -> str:
    """The new text a simulator answers to `body`, uninterrupted: for a prefilled request, the rest."""
    return expected_generation(body, default_max_tokens, max_output_tokens).text()


class Simulator:
    """The API server, its control server, the engine, the faults and the crash/restart cycle."""

    def __init__(self, model: str, physics: Physics, faults: Faults, time_scale: float = 1.0,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, max_output_tokens: int = MAX_OUTPUT_TOKENS,
                 seed: int = 0) -> None:
        self.model = model
        self.physics = physics
        self.faults = faults
        self.clock = Clock(time_scale)
        self.default_max_tokens = default_max_tokens
        self.max_output_tokens = max_output_tokens
        self.rng = random.Random(seed)
        self.engine = Engine(physics, self.clock, self._slowdown, self._on_oom)
        self.stats = Stats()
        self.api = HttpServer(self._handle_api, HOST, 0)
        self.control = HttpServer(self._handle_control, HOST, 0)
        self.crashed = False
        self._dying: asyncio.Task | None = None  # closing everything after a crash
        self.restart_at: float | None = None
        self.started_at = time.monotonic()
        self.created = int(time.time())
        self.active: set[Sequence] = set()  # every chat request being handled
        self._completion_ids = itertools.count(1)
        self._background: set[asyncio.Task] = set()

    # -- life cycle
    async def start(self, port: int = 0, control_port: int = 0) -> None:
        self.api.requested_port = port
        self.control.requested_port = control_port
        await self.control.start()
        await self.api.start()
        self.started_at = time.monotonic()
        self._spawn(self.engine.run())
        if self.faults.refuse:
            await self.api.stop_listening()

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.api.stop()
        await self.control.stop()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def up(self) -> bool:
        return self.api.listening and not self.crashed

    def crash(self, reason: str) -> None:
        """Die now: reset every connection, refuse new ones, come back empty after the restart time."""
        if self.crashed:
            return
        self.crashed = True
        self.stats.crashes += 1
        self.stats.crash_times.append(time.time())
        restart_in = self.clock.real(self.physics.restart_time)
        self.restart_at = time.time() + restart_in
        LOG.warning("CRASH (%s): %d requests cut; restarting in %.1f s", reason, len(self.active), restart_in)
        for seq in self.active:
            seq.cut_by_server = True
        self.stats.resets += len(self.active)
        self.engine.reset()
        self._dying = self._spawn(self.api.stop(reset=True))
        self._spawn(self._restart_later())

    async def wait_down(self) -> None:
        """After `crash`: returns once the port is closed and every connection cut."""
        if self._dying is not None:
            await asyncio.shield(self._dying)

    async def _restart_later(self) -> None:
        await self.wait_down()
        await self.clock.sleep(self.physics.restart_time)
        self.crashed = False
        self._dying = None
        self.restart_at = None
        self.started_at = time.monotonic()
        await self._sync_listening()
        LOG.warning("restarted%s", "" if self.api.listening else " (but refusing connections)")

    async def _sync_listening(self) -> None:
        """Listen exactly when neither crashed nor refusing."""
        want = not self.crashed and not self.faults.refuse
        if want and not self.api.listening:
            await self._listen_again()
        elif not want and self.api.listening:
            await self.api.stop_listening()

    async def _listen_again(self) -> None:
        """Bind the old port again; a client socket may briefly hold it, so retry a while."""
        for _ in range(40):
            try:
                await self.api.start()
                return
            except OSError as exc:
                LOG.warning("cannot listen on port %d yet (%s), retrying", self.api.port, exc)
                await asyncio.sleep(0.25)
        LOG.error("could not listen on port %d again; the API stays down", self.api.port)

    def _on_oom(self) -> None:
        used = self.engine.memory_used_mb()
        self.crash(f"out of memory: {used:.0f} MiB > {self.physics.memory_limit_mb:.0f} MiB, "
                   f"{len(self.engine.running)} running, {len(self.engine.queue)} queued")

    def _warmup(self) -> float:
        """1 at a (re)start, falling linearly to 0 at the end of the slow_start window."""
        window = self.clock.real(self.faults.slow_start)
        if window <= 0:
            return 0.0
        return max(0.0, 1.0 - (time.monotonic() - self.started_at) / window)

    def _slowdown(self) -> float:
        return 1.0 + SLOW_START_MAX_SLOWDOWN * self._warmup()

    # -- the API port
    async def _handle_api(self, request: Request, responder: Responder) -> None:
        if self.crashed:  # a connection accepted in the instant before the listener closed
            responder.abort()
            return
        body = self._parse_body(request)
        self._note_request(request, body)
        try:
            self._apply_status_faults()
            if request.method == "GET" and request.path == "/v1/models":
                await self._answer(responder, 200, self._models())
            elif request.method == "POST" and request.path in (CHAT_PATH, TEXT_PATH):
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object", "invalid_json")
                await self._generate(self._parse_generation(request.path, body), responder)
            elif request.method == "POST" and request.path in WIRE_PATHS:
                await self._generate_wire(request.path, body, responder)
            elif request.method == "POST" and request.path == EMBEDDINGS_PATH:
                await self._embeddings(body, responder)
            else:
                raise ApiError(404, f"no route for {request.method} {request.path}", "not_found")
        except ApiError as exc:
            wire = WIRE_PATHS.get(request.path)
            body = exc.body() if wire is None else wire.error_body(exc.status, str(exc))
            await self._answer(responder, exc.status, body, exc.headers())

    async def _generate_wire(self, path: str, body: Any, responder: Responder) -> None:
        """Anthropic Messages, Responses, Ollama: the same generation, on that API's wire (errors in its form:
        `_handle_api`)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        try:
            wire, chat = wire_for(path, self.model, body)
        except WireError as exc:
            raise ApiError(400, str(exc), "invalid_request") from None
        gen = self._parse_generation(CHAT_PATH, chat)
        gen.wire = wire
        await self._generate(gen, responder)

    async def _embeddings(self, body: Any, responder: Responder) -> None:
        try:
            answer = embeddings(self.model, body if isinstance(body, dict) else {})
        except WireError as exc:
            raise ApiError(400, str(exc), "invalid_input") from None
        await self._answer(responder, 200, answer)

    @staticmethod
    def _parse_body(request: Request) -> Any:
        if not request.body:
            return None
        try:
            return json.loads(request.body)
        except ValueError:
            return None

    def _note_request(self, request: Request, body: Any) -> None:
        self.stats.requests += 1
        self.stats.by_route[f"{request.method} {request.path}"] += 1
        self.stats.last_request = {
            "method": request.method,
            "path": request.path,
            "model": body.get("model") if isinstance(body, dict) else None,
            "authorization": request.header("authorization"),
            "x-api-key": request.header("x-api-key"),
        }

    def _apply_status_faults(self) -> None:
        if self.faults.status is not None:
            raise ApiError(self.faults.status, f"simulated status {self.faults.status}",
                           self.faults.status_code or "simulated_status", retry_after=self.faults.retry_after)
        if self.faults.error_rate and self.rng.random() < self.faults.error_rate:
            raise ApiError(500, "simulated internal server error", "simulated_error")

    async def _answer(self, responder: Responder, status: int, obj: Any,
                      headers: list[tuple[str, str]] | None = None) -> None:
        self.stats.by_status[str(status)] += 1
        await responder.respond(status, json_bytes(obj), headers or [("content-type", "application/json")])

    def _models(self) -> dict:
        return {"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "llmsim"}]}

    # -- chat and legacy completions
    def _parse_generation(self, path: str, body: dict) -> Generation:
        if path == TEXT_PATH:
            gen = parse_text(body, self.default_max_tokens, self.max_output_tokens)
        else:
            try:
                gen = parse_chat(body, self.default_max_tokens, self.max_output_tokens, self.faults.prefill)
            except PrefillRefused:
                self.stats.prefill_refused += 1
                raise
        if gen.prefill == "continued":
            self.stats.prefill_continuations += 1
        elif gen.prefill == "mismatch":
            self.stats.prefill_mismatches += 1
            LOG.warning("the final assistant message is not the beginning of this conversation's answer "
                        "(%r...): answering afresh", message_text(body["messages"][-1])[:40])
        return gen

    async def _generate(self, gen: Generation, responder: Responder) -> None:
        if self.faults.in_band_error:
            await self._in_band_error(gen, responder)
            return
        seq = Sequence(gen.prompt_tokens, gen.max_tokens)
        self.active.add(seq)
        watcher = asyncio.create_task(self._watch_client(seq, responder))
        try:
            if gen.stream and gen.wire is not None:  # these APIs send their opening events before any token
                await self._open_stream(responder, gen.wire.headers)
                await responder.send(gen.wire.preamble(gen.prompt_tokens))
            if not await self._wait_before_queue(seq):
                return
            if self.crashed:  # crashed during the wait; the listener is about to go
                responder.abort()
                return
            self.engine.submit(seq)  # may crash the server
            if gen.stream and gen.wire is not None:
                await self._stream_wire(seq, gen, gen.wire, responder)
            elif gen.stream:
                await self._stream(seq, gen, responder)
            else:
                await self._complete(seq, gen, responder)
        except ConnectionError:
            self._client_left(seq)
        finally:
            watcher.cancel()
            self.engine.cancel(seq)
            self.active.discard(seq)

    async def _watch_client(self, seq: Sequence, responder: Responder) -> None:
        await responder.disconnected.wait()
        self._client_left(seq)

    def _client_left(self, seq: Sequence) -> None:
        """The client closed its connection before the answer was complete: stop generating for it."""
        if seq.cut_by_server or seq.client_left or seq.delivered:
            return
        seq.client_left = True
        self.stats.client_disconnects += 1
        if seq.state == "new":
            seq.state = "cancelled"
            seq.tokens.put_nowait(CANCELLED)
        self.engine.cancel(seq)

    async def _wait_before_queue(self, seq: Sequence) -> bool:
        """first_token_delay and the slow_start warm-up delay; False if the client left meanwhile."""
        delay = self.faults.first_token_delay + SLOW_START_MAX_DELAY * self._warmup()
        if delay <= 0:
            return True
        try:
            await asyncio.wait_for(seq.tokens.get(), self.clock.real(delay))
        except TimeoutError:
            return True
        return False  # CANCELLED: the client left

    async def _send_tokens(self, seq: Sequence, responder: Responder, send_token) -> int | None:
        """Send each token as the engine makes it (`await send_token(item, sent)`), under the fault switches
        (reset, stall, no_done); the number sent, or None when the stream was cut or the client left."""
        sent, stalled = 0, False
        while True:
            item = await seq.tokens.get()
            if item in (CANCELLED, CUT):
                if item == CUT:
                    responder.abort()
                return None
            if self._reset_due(seq, sent, responder):
                return None
            if not stalled and self.faults.stall_after_chunks == sent:
                stalled = True
                await self._stall(responder)
            if item == DONE or self.faults.ends_without_done(sent, at_end=False):
                return sent
            await send_token(item, sent)
            sent += 1

    async def _ended_without_done(self, seq: Sequence, responder: Responder, sent: int) -> bool:
        """no_done: end the message cleanly, without the API's ending events."""
        if not self.faults.ends_without_done(sent, at_end=True):
            return False
        await responder.end()
        seq.delivered = True
        self.stats.ended_without_done += 1
        return True

    async def _stream(self, seq: Sequence, gen: Generation, responder: Responder) -> None:
        chunk = self._chunk_factory(gen)

        async def send_token(item: int, sent: int) -> None:
            await self._open_stream(responder)
            await responder.send(sse(chunk(gen.shape.token_choice(gen.token(item), opening=sent == 0))))

        sent = await self._send_tokens(seq, responder, send_token)
        if sent is None:
            return
        await self._open_stream(responder)
        if await self._ended_without_done(seq, responder, sent):
            return
        if sent == 0 and (opening := gen.shape.opening_choice()) is not None:
            await responder.send(sse(chunk(opening)))
        await responder.send(sse(chunk(gen.shape.finish_choice(gen.finish_reason))))
        if gen.include_usage:
            await responder.send(sse(chunk(None, usage=self._usage(seq, gen))))
        await responder.send(b"data: [DONE]\n\n")
        await responder.end()
        seq.delivered = True
        self.stats.completed += 1

    async def _stream_wire(self, seq: Sequence, gen: Generation, wire: Wire, responder: Responder) -> None:
        """`_stream` for the other APIs: one event (or line) per token, then that API's ending events."""

        async def send_token(item: int, sent: int) -> None:
            await responder.send(wire.token(gen.token(item)))

        sent = await self._send_tokens(seq, responder, send_token)
        if sent is None or await self._ended_without_done(seq, responder, sent):
            return
        await responder.send(wire.end(gen.finish_reason, gen.prompt_tokens, seq.generated))
        await responder.end()
        seq.delivered = True
        self.stats.completed += 1

    async def _open_stream(self, responder: Responder, headers: list[tuple[str, str]] = SSE_HEADERS) -> None:
        """The status line and headers, with the first thing the stream sends."""
        if not responder.started:
            self.stats.by_status["200"] += 1
            await responder.start(200, headers)

    async def _stall(self, responder: Responder) -> None:
        """stall_after_chunks: send nothing (or only keep-alive comments) for stall_seconds."""
        self.stats.stalls += 1
        deadline = time.monotonic() + self.clock.real(self.faults.stall_seconds)
        keepalive = self.faults.stall_keepalive
        interval = self.clock.real(KEEPALIVE_INTERVAL) if keepalive else math.inf
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(responder.disconnected.wait(), min(left, interval))
            if responder.disconnected.is_set():
                raise ConnectionResetError("the client left during a stall")
            if keepalive and deadline - time.monotonic() > 0.001:  # a keep-alive interval passed
                await self._open_stream(responder)
                await responder.send(KEEPALIVE)

    def _reset_due(self, seq: Sequence, sent: int, responder: Responder) -> bool:
        """reset_after_chunks: cut the connection once that many events went out."""
        limit = self.faults.reset_after_chunks
        if limit is None or sent < limit:
            return False
        self._reset(seq, responder)
        return True

    def _reset(self, seq: Sequence, responder: Responder) -> None:
        seq.cut_by_server = True
        self.stats.resets += 1
        responder.abort()

    def _chunk_factory(self, gen: Generation):
        shape = gen.shape
        completion_id = f"{shape.id_prefix}{next(self._completion_ids)}"
        created = int(time.time())

        def chunk(choice: dict | None, usage: dict | None = None) -> dict:
            obj = {"id": completion_id, "object": shape.chunk_object, "created": created, "model": self.model,
                   **shape.extra, "choices": [] if choice is None else [choice]}
            if gen.include_usage:
                obj["usage"] = usage
            return obj

        return chunk

    async def _complete(self, seq: Sequence, gen: Generation, responder: Responder) -> None:
        tokens = []
        while (item := await seq.tokens.get()) not in (DONE, CANCELLED, CUT):
            tokens.append(gen.token(item))
        if item == CUT:
            responder.abort()
        elif item == DONE and self.faults.reset_after_chunks is not None:
            self._reset(seq, responder)
        if item != DONE or responder.disconnected.is_set():
            return
        if gen.wire is not None:
            text = "".join(tokens)
            await self._answer(responder, 200, gen.wire.whole(text, gen.finish_reason, gen.prompt_tokens, seq.generated))
            seq.delivered = True
            self.stats.completed += 1
            return
        shape = gen.shape
        await self._answer(responder, 200, {
            "id": f"{shape.id_prefix}{next(self._completion_ids)}", "object": shape.whole_object,
            "created": int(time.time()), "model": self.model, **shape.extra,
            "choices": [shape.whole_choice("".join(tokens), gen.finish_reason)],
            "usage": self._usage(seq, gen),
        })
        seq.delivered = True
        self.stats.completed += 1

    @staticmethod
    def _usage(seq: Sequence, gen: Generation) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": seq.generated,
                "total_tokens": gen.prompt_tokens + seq.generated}

    async def _in_band_error(self, gen: Generation, responder: Responder) -> None:
        error = ApiError(500, "simulated in-band error", "simulated_in_band_error").body()
        if gen.wire is not None and gen.stream:
            await self._open_stream(responder, gen.wire.headers)
            await responder.send(gen.wire.preamble(gen.prompt_tokens) + gen.wire.in_band_error("simulated in-band error"))
            await responder.end()
            return
        self.stats.by_status["200"] += 1
        if not gen.stream:
            await responder.respond(200, json_bytes(error), [("content-type", "application/json")])
            return
        await responder.start(200, SSE_HEADERS)
        await responder.send(sse(error))
        await responder.end()

    # -- the control port
    async def _handle_control(self, request: Request, responder: Responder) -> None:
        route = (request.method, request.path)
        try:
            if route == ("GET", "/_sim/stats"):
                result = self.snapshot()
            elif route == ("GET", "/_sim/faults"):
                result = asdict(self.faults)
            elif route == ("POST", "/_sim/faults"):
                result = await self._set_faults(request.body)
            elif route == ("POST", "/_sim/crash"):
                self.crash("forced by POST /_sim/crash")
                await self.wait_down()
                result = {"crashed": True, "restart_at": self.restart_at}
            else:
                raise ApiError(404, f"no route for {request.method} {request.path}", "not_found")
        except ApiError as exc:
            await responder.respond(exc.status, json_bytes(exc.body()), [("content-type", "application/json")])
            return
        await responder.respond(200, json_bytes(result), [("content-type", "application/json")])

    async def _set_faults(self, body: bytes) -> dict:
        try:
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            self.faults = self.faults.updated(changes)
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_fault") from None
        LOG.info("faults: %s", json.dumps(asdict(self.faults)))
        await self._sync_listening()
        return asdict(self.faults)

    def snapshot(self) -> dict:
        limit = self.physics.memory_limit_mb
        return {
            "model": self.model,
            "up": self.up,
            "listening": self.api.listening,
            "crashed": self.crashed,
            "restart_at": self.restart_at,
            "time_scale": self.clock.scale,
            "requests": self.stats.requests,
            "by_route": dict(self.stats.by_route),
            "by_status": dict(self.stats.by_status),
            "completed": self.stats.completed,
            "in_flight": len(self.active),
            "running": len(self.engine.running),
            "queued": len(self.engine.queue),
            "peak_batch": self.engine.peak_batch,
            "peak_queue": self.engine.peak_queue,
            "memory_used_mb": round(self.engine.memory_used_mb(), 1),
            "memory_limit_mb": None if math.isinf(limit) else limit,
            "crashes": self.stats.crashes,
            "crash_times": list(self.stats.crash_times),
            "resets": self.stats.resets,
            "client_disconnects": self.stats.client_disconnects,
            "stalls": self.stats.stalls,
            "prefill_continuations": self.stats.prefill_continuations,
            "prefill_mismatches": self.stats.prefill_mismatches,
            "prefill_refused": self.stats.prefill_refused,
            "ended_without_done": self.stats.ended_without_done,
            "last_request": dict(self.stats.last_request),
            "faults": asdict(self.faults),
        }


# -- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmsim.server", description=__doc__.split("\n\n")[0],
                                epilog="The physics and the fault switches are explained in the module docstring "
                                       "(python -c 'import llmsim.server; help(llmsim.server)').")
    p.add_argument("--preset", choices=sorted(PRESETS), default="primary",
                   help="primary (default): DeepSeek-R1-Distill-Qwen-7B on an A10, overloadable; "
                        "fallback: qwen-plus at a cloud provider, never crashes")
    p.add_argument("--model", help="the served model name; default: the preset's")
    p.add_argument("--port", type=int, default=0, help="API port on 127.0.0.1; 0 (default) picks a free one")
    p.add_argument("--control-port", type=int, default=0,
                   help="port of /_sim/* on 127.0.0.1; 0 (default) picks a free one")
    p.add_argument("--no-physics", action="store_true", help="an ideal server: no queue, no delays, no memory limit")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies every duration; default 1")
    p.add_argument("--seed", type=int, default=0, help="seed of error_rate's coin; default 0")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"answer length when the request names no max_tokens; default {DEFAULT_MAX_TOKENS}")
    p.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS,
                   help=f"cap on max_tokens; default {MAX_OUTPUT_TOKENS}")
    p.add_argument("--log-level", default="INFO", help="of the lines on stderr; default INFO")
    physics = p.add_argument_group("physics; each defaults to the preset's value, shown as primary / fallback")
    for name, flag, meaning in [
        ("max_batch", "--max-batch", "sequences decoded at once"),
        ("token_time", "--token-time", "seconds per decode step at batch 1"),
        ("batch_alpha", "--batch-alpha", "a step takes this fraction longer per extra sequence in the batch"),
        ("prefill_time", "--prefill-time", "seconds of prefill per request"),
        ("prefill_per_token", "--prefill-per-token", "seconds of prefill per prompt token"),
        ("memory_limit_mb", "--memory-limit", "MiB; past it the server crashes"),
        ("base_memory_mb", "--base-memory", "MiB of weights and runtime"),
        ("request_memory_mb", "--request-memory", "MiB each accepted (queued or running) request reserves"),
        ("kv_per_token_kb", "--kv-per-token", "KiB of KV cache per context token"),
        ("restart_time", "--restart-time", "seconds the server is down after a crash"),
    ]:
        kind = int if name == "max_batch" else float
        shown = f"{getattr(PRIMARY, name):g} / {getattr(FALLBACK, name):g}"
        physics.add_argument(flag, dest=name, type=kind, help=f"{meaning}; {shown}")
    faults = p.add_argument_group("faults; also settable at run time by POST /_sim/faults with the same names")
    faults.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    faults.add_argument("--status", type=int, default=None, help="answer every request with this status")
    faults.add_argument("--in-band-error", action="store_true", help="the first SSE event is an error object")
    faults.add_argument("--first-token-delay", type=float, default=0.0,
                        help="seconds before a request joins the queue")
    faults.add_argument("--reset-after-chunks", type=int, default=None,
                        help="cut each stream with a TCP reset after this many events")
    faults.add_argument("--refuse", action="store_true", help="start with the API port refusing connections")
    faults.add_argument("--slow-start", type=float, default=0.0,
                        help="seconds of warm-up after each (re)start, during which the server is slow")
    faults.add_argument("--stall-after-chunks", type=int, default=None,
                        help="each stream goes silent after this many content events")
    faults.add_argument("--stall-seconds", type=float, default=60.0, help="how long a stall lasts; default 60")
    faults.add_argument("--stall-keepalive", action="store_true",
                        help="send a keep-alive comment every second of a stall")
    faults.add_argument("--no-done", nargs="?", type=int, const=True, default=False, metavar="N",
                        help="streams end cleanly without their finish chunk and [DONE]: after the last "
                             "content event, or after N of them")
    faults.add_argument("--prefill", choices=PREFILL_MODES, default="any",
                        help="which final assistant messages are continued: any (default), vllm "
                             "(continue_final_message), deepseek (prefix: true), reject (400)")
    args = p.parse_args(argv)
    if args.time_scale <= 0:
        p.error("--time-scale must be positive")
    return args


def build(args: argparse.Namespace) -> Simulator:
    model, physics = PRESETS[args.preset]
    if args.no_physics:
        physics = IDEAL
    overrides = {f.name: getattr(args, f.name) for f in fields(Physics) if getattr(args, f.name, None) is not None}
    physics = replace(physics, **overrides)
    faults = Faults().updated({
        "error_rate": args.error_rate, "status": args.status, "in_band_error": args.in_band_error,
        "first_token_delay": args.first_token_delay, "reset_after_chunks": args.reset_after_chunks,
        "refuse": args.refuse, "slow_start": args.slow_start, "stall_after_chunks": args.stall_after_chunks,
        "stall_seconds": args.stall_seconds, "stall_keepalive": args.stall_keepalive, "no_done": args.no_done,
        "prefill": args.prefill,
    })
    return Simulator(args.model or model, physics, faults, time_scale=args.time_scale,
                     default_max_tokens=args.default_max_tokens, max_output_tokens=args.max_output_tokens,
                     seed=args.seed)


async def serve(sim: Simulator, args: argparse.Namespace) -> None:
    await sim.start(args.port, args.control_port)
    print(json.dumps({
        "listening": f"http://{HOST}:{sim.api.port}", "control": sim.control.url, "model": sim.model,
        "preset": args.preset, "physics": not args.no_physics, "time_scale": args.time_scale,
    }), flush=True)
    if args.time_scale != 1.0:
        LOG.info("time scale %g: every duration is multiplied by it (a %g s restart takes %g s)",
                 args.time_scale, sim.physics.restart_time, sim.clock.real(sim.physics.restart_time))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s llmsim[{args.model or PRESETS[args.preset][0]}] %(message)s")
    try:
        sim = build(args)
    except ValueError as exc:  # a bad fault value on the command line
        sys.exit(f"llmsim: {exc}")
    try:
        asyncio.run(serve(sim, args))
    except OSError as exc:
        sys.exit(f"llmsim: cannot listen: {exc}")


if __name__ == "__main__":
    main()
