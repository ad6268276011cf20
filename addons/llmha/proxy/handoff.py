"""Hands open upstream streams to mitmproxy through a server on loopback.

mitmproxy sends a response that an addon sets whole, so a streaming answer that the gate holds open
cannot be given to it directly. Instead the flow is pointed at this server with a one-time token;
mitmproxy fetches it like any upstream and streams it to the client chunk by chunk. The flow's real
URL is put back in `responseheaders`, so what is shown and recorded is the client's request.

A token not fetched within `claim_timeout` (the flow was killed, the client left) is dropped and its
upstream stream closed, so nothing leaks. However a stream ends, its attempt's lease is released once,
with the outcome: OK, STREAM_CUT when the upstream broke, CANCELLED when the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

import httpx

from ..core.types import Outcome
from .gate import OpenStream
from .httpserver import HttpServer, Request, Responder

logger = logging.getLogger(__name__)

PATH_PREFIX = "/llm-ha/handoff/"


@dataclass
class _Pending:
    stream: OpenStream
    extra_headers: list[tuple[str, str]]
    expiry: asyncio.TimerHandle


class HandoffServer:
    def __init__(self, claim_timeout: float = 30.0) -> None:
        self.claim_timeout = claim_timeout
        self._pending: dict[str, _Pending] = {}
        self._server = HttpServer(self._serve)
        self._expiries: set[asyncio.Task] = set()
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

    def register(self, stream: OpenStream, extra_headers: list[tuple[str, str]]) -> str:
        """Park an open stream; returns the path under which mitmproxy fetches it once."""
        token = secrets.token_urlsafe(18)
        expiry = asyncio.get_running_loop().call_later(self.claim_timeout, self._spawn_expiry, token)
        self._pending[token] = _Pending(stream, extra_headers, expiry)
        return PATH_PREFIX + token

    def release(self, path: str) -> None:
        """The flow died before fetching its stream: close it now."""
        token = path.removeprefix(PATH_PREFIX)
        if token in self._pending:
            self._spawn_expiry(token)

    def _spawn_expiry(self, token: str) -> None:
        task = asyncio.ensure_future(self._expire(token))
        self._expiries.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._expiries.discard)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _expire(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        pending.expiry.cancel()
        await pending.stream.close(Outcome.CANCELLED)

    async def _serve(self, request: Request, responder: Responder) -> None:
        pending = self._pending.pop(request.path.removeprefix(PATH_PREFIX), None)
        if pending is None:
            await responder.respond(410, b'{"error": {"message": "llm-ha: unknown or expired stream", '
                                         b'"type": "internal_error", "code": "handoff_expired"}}',
                                    [("content-type", "application/json")])
            return
        pending.expiry.cancel()
        self.active += 1
        try:
            await self._deliver(pending, responder)
        finally:
            self.active -= 1
            await pending.stream.close(Outcome.CANCELLED)  # a no-op unless _deliver was interrupted

    async def _deliver(self, pending: _Pending, responder: Responder) -> None:
        stream = pending.stream
        await responder.start(stream.status, [*stream.headers, *pending.extra_headers])
        pump = asyncio.create_task(self._pump(stream, responder))
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
        await stream.close(outcome)

    async def _pump(self, stream: OpenStream, responder: Responder) -> Outcome:
        try:
            async for chunk in stream.chunks():
                await responder.send(chunk)
        except ConnectionError:
            return Outcome.CANCELLED
        except (httpx.HTTPError, OSError) as e:
            logger.info(f"llm-ha: {stream.record.upstream} {stream.record.node} cut its stream: {type(e).__name__}")
            responder.abort()  # the client must see a broken stream, not a clean end
            return Outcome.STREAM_CUT
        return Outcome.OK
