"""Hands open upstream streams to mitmproxy through a server on loopback, and keeps them going.

mitmproxy sends a response that an addon sets whole, so a streaming answer that the gate holds open
cannot be given to it directly. Instead the flow is pointed at this server with a one-time token;
mitmproxy fetches it like any upstream and streams it to the client chunk by chunk. The flow's real
URL is put back in `responseheaders`, so what is shown and recorded is the client's request.

On the way, a stream of a protocol llm-ha can follow (`core/splice.py`) is watched event by event:
- only whole events are passed on, so a break never leaves half an event with the client;
- when the protocol's end (`[DONE]`, Anthropic's `message_stop`, ...) arrives, it goes out together
  with the end of the message, so mitmproxy has the whole response (and records it) before a client
  that hangs up at the end leaves;
- no data event for `stream_idle_timeout` is a stall; a reset, a cut, an in-band error event or an end
  without the protocol's end is a break. Either is handed to the relay's `resume`, which may continue
  the answer on another node; the continuation's events are rewritten into the client's stream. If
  it cannot, the client gets an in-band error event naming the break, then the broken connection:
  never a truncated answer dressed as complete.

A token not fetched within `claim_timeout` (the flow was killed, the client left) is dropped and its
upstream stream closed, so nothing leaks. However a stream ends, its attempt's lease is released
once, with the outcome: OK, a break, or CANCELLED when the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..core.splice import Answer, Splicer, StreamFollower, splice_comment
from ..core.types import Outcome
from ..tasks import background
from .gate import OpenStream
from .httpserver import HttpServer, Request, Responder

logger = logging.getLogger(__name__)

PATH_PREFIX = "/llm-ha/handoff/"
DRAIN_AFTER_END_S = 1.0  # how long the upstream may take to close its response after `[DONE]`

Resumer = Callable[["Relay", OpenStream, Outcome], Awaitable[OpenStream | None]]


@dataclass
class Relay:
    """One streamed answer on its way to the client, across the continuations it may need."""

    stream: OpenStream
    extra_headers: list[tuple[str, str]]
    follower: StreamFollower | None = None  # None: a stream llm-ha cannot follow, passed on as it comes
    resume: Resumer | None = None
    why_not_resumed: str = ""  # set by `resume` when it declines
    breaks: list[tuple[OpenStream, Outcome]] = field(default_factory=list)

    @property
    def answer(self) -> Answer | None:
        return self.follower.answer if self.follower else None


class IdleTimer:
    """`stream_idle_timeout` on one stream, cheap per chunk: progress only notes the time; a timer checks
    now and then and, once the stream has been silent for the whole limit, ends the `asyncio.timeout`."""

    def __init__(self, idle: float, timeout: asyncio.Timeout) -> None:
        self.idle = idle
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._handle = self.loop.call_at(self.last + idle, self._check)

    def progress(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        if self.loop.time() >= self.last + self.idle:
            self.timeout.reschedule(self.loop.time())  # TimeoutError in the pump: a stall
        else:
            self._handle = self.loop.call_at(self.last + self.idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass
class _Pending:
    relay: Relay
    expiry: asyncio.TimerHandle


class HandoffServer:
    def __init__(self, claim_timeout: float = 30.0) -> None:
        self.claim_timeout = claim_timeout
        self._pending: dict[str, _Pending] = {}
        self._server = HttpServer(self._serve)
        self.active = 0  # streams being pumped to mitmproxy

    async def start(self) -> None:
        await self._server.start()

    @property
    def port(self) -> int:
        return self._server.port

    async def stop(self) -> None:
        await self._server.stop()
        for token in list(self._pending):
            await self._expire(token)

    async def drain(self, limit: float) -> None:
        """Wait (at most `limit` seconds) until no stream is parked or being pumped."""
        deadline = asyncio.get_running_loop().time() + limit
        while (self.active or self._pending) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)

    def register(self, relay: Relay) -> str:
        """Park an open stream; returns the path under which mitmproxy fetches it once."""
        token = secrets.token_urlsafe(18)
        expiry = asyncio.get_running_loop().call_later(self.claim_timeout, self._spawn_expiry, token)
        self._pending[token] = _Pending(relay, expiry)
        return PATH_PREFIX + token

    def release(self, path: str) -> None:
        """The flow died before fetching its stream: close it now."""
        token = path.removeprefix(PATH_PREFIX)
        if token in self._pending:
            self._spawn_expiry(token)

    def _spawn_expiry(self, token: str) -> None:
        background(self._expire(token))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _expire(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        pending.expiry.cancel()
        await pending.relay.stream.close(Outcome.CANCELLED)

    async def _serve(self, request: Request, responder: Responder) -> None:
        pending = self._pending.pop(request.path.removeprefix(PATH_PREFIX), None)
        if pending is None:
            await responder.respond(410, b'{"error": {"message": "llm-ha: unknown or expired stream", '
                                         b'"type": "internal_error", "code": "handoff_expired"}}',
                                    [("content-type", "application/json")])
            return
        pending.expiry.cancel()
        relay = pending.relay
        self.active += 1
        try:
            stream = relay.stream
            await responder.start(stream.status, [*stream.headers, *relay.extra_headers], stream.reason)
            await self._deliver(relay, responder)
        finally:
            self.active -= 1
            await relay.stream.close(Outcome.CANCELLED)  # a no-op unless delivery was interrupted

    async def _deliver(self, relay: Relay, responder: Responder) -> None:
        splicer: Splicer | None = None
        while True:
            stream = relay.stream
            pump = asyncio.create_task(self._pump(stream, responder, relay.follower, splicer))
            left = asyncio.create_task(responder.disconnected.wait())
            await asyncio.wait({pump, left}, return_when=asyncio.FIRST_COMPLETED)
            left.cancel()
            if pump.done():
                outcome = pump.result()
            else:  # the client left
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                outcome = Outcome.CANCELLED
            if outcome.broke_stream:
                stream.record.events = relay.answer.events if relay.answer else 0
            await stream.close(outcome)
            if not outcome.broke_stream:
                return
            relay.breaks.append((stream, outcome))
            continuation = await self._continue(relay, stream, outcome, responder)
            if continuation is None:
                return
            relay.stream = continuation
            splicer = Splicer(relay.follower.protocol, relay.follower.answer) if relay.follower else None

    async def _continue(self, relay: Relay, broken: OpenStream, outcome: Outcome,
                        responder: Responder) -> OpenStream | None:
        """After a break: end a whole answer properly, continue a partial one, or pass the break on."""
        answer = relay.answer
        where = f"{broken.record.upstream} {broken.record.node}"
        chunks = f"{answer.events} events" if answer else "its first bytes"
        if answer is not None and answer.complete:  # only the closing marker was missing
            await responder.end(relay.follower.protocol.end_marker if relay.follower else b"")
            return None
        continuation = await relay.resume(relay, broken, outcome) if relay.resume and answer else None
        if continuation is not None:
            await responder.send(splice_comment(
                f"llm-ha: {where} {outcome.value} after {chunks}; resumed on "
                f"{continuation.record.upstream} {continuation.record.node}"))
            return continuation
        logger.info(f"llm-ha: {where} broke its stream ({outcome.value} after {chunks})"
                    + (f"; not resumed: {relay.why_not_resumed}" if relay.why_not_resumed else ""))
        if relay.follower is not None:
            why = f": {relay.why_not_resumed}" if relay.why_not_resumed else ""
            await responder.send(relay.follower.protocol.error_event(
                f"llm-ha: the stream from {broken.record.upstream} broke ({outcome.value} after {chunks}) "
                f"and could not be continued{why}", f"stream_{outcome.value}"))
        responder.abort()  # the client must see a broken stream, not a clean end
        return None

    async def _pump(self, stream: OpenStream, responder: Responder, follower: StreamFollower | None,
                    splicer: Splicer | None) -> Outcome:
        """Pass one upstream stream on until it ends: OK, a break, or CANCELLED (the client left)."""
        chunks = stream.chunks()
        idle: IdleTimer | None = None
        try:
            async with asyncio.timeout(None) as timeout:
                idle = IdleTimer(stream.candidate.upstream.stream_idle_timeout, timeout)
                async for chunk in chunks:
                    if splicer is not None:
                        chunk = splicer.feed(chunk)
                    if follower is None:
                        idle.progress()
                        await responder.send(chunk)
                        continue
                    chunk = follower.feed(chunk)
                    if follower.progressed:
                        idle.progress()
                    if follower.answer.error is not None:
                        await responder.send(chunk)
                        return Outcome.IN_BAND_ERROR
                    if follower.answer.done:
                        stream.mark_delivered()
                        await responder.end(chunk)
                        await self._drain(chunks)
                        return Outcome.OK
                    await responder.send(chunk)
        except TimeoutError:
            return Outcome.STALLED
        except ConnectionError:
            return Outcome.CANCELLED
        except OSError as e:  # the upstream's connection broke (UpstreamError)
            logger.debug(f"llm-ha: {stream.record.upstream} {stream.record.node} cut its stream: {type(e).__name__}")
            return Outcome.STREAM_CUT
        finally:
            if idle is not None:
                idle.cancel()
        if follower is None:
            await responder.end()
            return Outcome.OK
        return Outcome.TRUNCATED

    @staticmethod
    async def _drain(chunks) -> None:
        """Read the upstream's end after `[DONE]`, briefly, so its connection can be reused."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DRAIN_AFTER_END_S):
                async for _ in chunks:
                    pass
