"""Hands open upstream streams to mitmproxy, and keeps them going.

mitmproxy sends a response that an addon sets whole, so a streaming answer that the gate holds open
cannot be given to it directly. Instead the flow is pointed at this server with a one-time token;
mitmproxy fetches it like any upstream and streams it to the client chunk by chunk.

This hop carries the body only. Asked for a token, it answers at once with a head that frames the
body (`200`, chunked; a connection closed at the end for HTTP/1.0) and nothing else: the answer's own
head (status, headers) is not known before the gate has the first token, and is set on the flow in
its `responseheaders` hook (`addons/flowgate.py`), which waits for it. So mitmproxy parses the hop's
head and runs its `responseheaders` hook while the upstream is still producing the first token,
instead of after it. The flow's real URL is put back in that hook too, so what is shown and recorded
is the client's request and the answer's head.

The token can be `reserve`d before the gate has an answer: mitmproxy then asks while the gate still
waits for the first token, and the body follows once the gate `fulfil`s it (with the open stream, or
a whole answer such as an error). A connection lost while it waits `abandon`s the answer (the gate is
stopped); an answer given after nobody waits any more is closed.

The hop costs little: mitmproxy's connection to this server is made in memory (`pipe.Shortcut`; the
server listens on loopback TCP too, for a loop that takes no shortcut), and each upstream chunk goes
from the upstream connection's `data_received` through the `Delivery` into mitmproxy's reader in one
call: no task, no socket and no second parse in between. mitmproxy reads it as it would read the
upstream itself.

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

A token not asked for within `claim_timeout` (the flow was killed, the client left) is dropped and its
upstream stream closed (or its gate stopped), so nothing leaks; once asked for, the asking connection
holds it, however long the gate takes. However a stream ends, its attempt's lease is released once,
with the outcome: OK, a break, or CANCELLED when the client left. A hand-off connection that
mitmproxy keeps for its client's next request holds no socket when it is in memory; it is closed
with the client's connection, as mitmproxy's own server connections are, or when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from ..core.splice import Answer, Splicer, StreamFollower, splice_comment
from ..core.types import Outcome
from .gate import CompleteAnswer, OpenStream
from .httpserver import path_of
from .pipe import Shortcut

logger = logging.getLogger(__name__)

PATH_PREFIX = "/llm-ha/handoff/"
DRAIN_AFTER_END_S = 1.0  # how long the upstream may take to end its response after `[DONE]`
MAX_REQUEST_HEAD = 64 * 1024
_FRAMING = {"content-length", "transfer-encoding", "connection", "keep-alive"}  # the hop's and the client's own

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


Parcel = Relay | CompleteAnswer  # a stream, or an answer the gate has whole (an error, JSON for a stream request)


@dataclass
class _Pending:
    """A token's answer: ready (`parcel`), or still being gated, with a connection that may wait for it."""

    expiry: asyncio.TimerHandle
    parcel: Parcel | None = None
    abandon: Callable[[], None] | None = None  # stops the gate of an answer not ready yet
    waiting: HandoffConnection | None = None


class HandoffServer:
    def __init__(self, claim_timeout: float = 30.0) -> None:
        self.claim_timeout = claim_timeout
        self._pending: dict[str, _Pending] = {}  # by path
        self._server: asyncio.Server | None = None
        self._shortcut: Shortcut | None = None
        self._connections: set[HandoffConnection] = set()
        self.active = 0  # streams being delivered to mitmproxy
        self.in_memory = False  # mitmproxy reaches this server without a socket

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        self._shortcut = Shortcut(("127.0.0.1", self._port), self._connection)
        self.in_memory = self._shortcut.install()

    @property
    def port(self) -> int:
        return self._port

    @property
    def in_memory_connections(self) -> int:
        return self._shortcut.connections if self._shortcut else 0

    async def stop(self) -> None:
        if self._shortcut is not None:
            self._shortcut.remove()
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self._connections):
            connection.abort()
        await asyncio.sleep(0)  # the aborted connections' `connection_lost` end their streams
        for path in list(self._pending):
            self.release(path)

    async def drain(self, limit: float) -> None:
        """Wait (at most `limit` seconds) until no stream is parked or being delivered."""
        deadline = asyncio.get_running_loop().time() + limit
        while (self.active or self._pending) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)

    def register(self, relay: Relay) -> str:
        """Park an open stream; returns the path under which mitmproxy fetches it once."""
        path = self.reserve()
        self.fulfil(path, relay)
        return path

    def reserve(self, abandon: Callable[[], None] | None = None) -> str:
        """A path for an answer still being gated, so that mitmproxy can ask for it while the gate waits
        for the first token; `fulfil` gives the answer. `abandon` is called if the answer will not be
        wanted any more (the flow died, its connection was lost, nobody asked in time)."""
        path = PATH_PREFIX + secrets.token_urlsafe(18)
        expiry = asyncio.get_running_loop().call_later(self.claim_timeout, self.release, path)
        self._pending[path] = _Pending(expiry, abandon=abandon)
        return path

    def fulfil(self, path: str, parcel: Parcel) -> None:
        """The answer for a reserved path: delivered at once if mitmproxy is waiting for it, else kept.
        An answer nobody wants any more is closed."""
        pending = self._pending.get(path)
        if pending is None:
            _discard(parcel)
            return
        pending.parcel, pending.abandon = parcel, None
        if pending.waiting is not None:
            self._take(path, pending)
            pending.waiting.deliver(parcel)

    def release(self, path: str) -> None:
        """The flow died before fetching its answer, or did not fetch it in time: stop or close it now."""
        pending = self._pending.pop(path, None)
        if pending is None:
            return
        pending.expiry.cancel()
        if pending.parcel is not None:
            _discard(pending.parcel)
        elif pending.abandon is not None:
            pending.abandon()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _take(self, path: str, pending: _Pending) -> None:
        del self._pending[path]
        pending.expiry.cancel()

    def _ask(self, path: str, connection: HandoffConnection) -> bool:
        """`connection` asks for `path`: its answer is delivered now or once ready; False: unknown token."""
        pending = self._pending.get(path)
        if pending is None or pending.waiting is not None:
            return False
        connection.open_body()
        if pending.parcel is None:
            pending.waiting = connection
            pending.expiry.cancel()  # asked for: the connection holds it now (its loss releases it)
        else:
            self._take(path, pending)
            connection.deliver(pending.parcel)
        return True

    def _connection(self) -> HandoffConnection:
        return HandoffConnection(self)


class HandoffConnection(asyncio.Protocol):
    """One connection from mitmproxy (in memory or TCP): requests one after the other, each answered
    with what its token names, as soon as the gate has it."""

    def __init__(self, server: HandoffServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.delivery: Delivery | None = None
        self.asked: str | None = None  # the path of an answer still being gated, waited for
        self.closed = False
        self._buffer = b""
        self._skip = 0  # bytes of a request body still to pass over
        self._chunked = True  # this response's framing: chunks (HTTP/1.1), or up to the close (HTTP/1.0)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        if self.asked is not None:
            self.server.release(self.asked)
            self.asked = None
        if self.delivery is not None:
            self.delivery.client_left()

    def pause_writing(self) -> None:
        if self.delivery is not None:
            self.delivery.pause()

    def resume_writing(self) -> None:
        if self.delivery is not None:
            self.delivery.resume()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.busy:
            self._next_request()

    def eof_received(self) -> bool:
        return self.busy  # mitmproxy half-closed: finish the answer under way, if any

    @property
    def busy(self) -> bool:
        return self.delivery is not None or self.asked is not None

    # -- requests

    def _next_request(self) -> None:
        if self._skip:
            skipped = min(self._skip, len(self._buffer))
            self._buffer, self._skip = self._buffer[skipped:], self._skip - skipped
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_REQUEST_HEAD:
                self.abort()
            return
        head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4:]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            self.abort()
            return
        length = dict(_header(line) for line in header_lines).get("content-length", "0")
        self._skip = int(length) if length.isdigit() else 0
        self._chunked = parts[2] != "HTTP/1.0"
        path = self.asked = path_of(parts[1])
        if not self.server._ask(path, self):
            self.asked = None
            self._respond_gone()
            self._next_request()

    def open_body(self) -> None:
        """The head of this hop's response: it frames the body, the answer's own head is set on the flow."""
        self._write(_BODY_HEAD if self._chunked else _BODY_HEAD_TO_CLOSE)

    def deliver(self, parcel: Parcel) -> None:
        """Send `parcel`'s body as the body of the response under way."""
        self.asked = None
        self.server.active += 1
        if isinstance(parcel, CompleteAnswer):
            self.end(parcel.body)
            self.delivered()
        else:
            self.delivery = Delivery(parcel, self)
            self.delivery.start()

    def _respond_gone(self) -> None:
        body = (b'{"error": {"message": "llm-ha: unknown or expired stream", "type": "internal_error", '
                b'"code": "handoff_expired"}}')
        self._write(b"HTTP/1.1 410 Gone\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                    % (len(body), body))

    # -- the body, for the delivery

    def send(self, data: bytes) -> None:
        if data:
            self._write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def end(self, last: bytes = b"") -> None:
        """End the message; `last` data goes out in the same write, so the peer sees both at once."""
        if self._chunked:
            self._write((b"%x\r\n%b\r\n" % (len(last), last) if last else b"") + b"0\r\n\r\n")
        else:
            self.send(last)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Cut the connection: the client must see a broken stream, not a clean end."""
        if self.transport is not None:
            self.transport.abort()

    def delivered(self) -> None:
        """The answer under way is over (sent, broken or abandoned): ready for the next request."""
        self.delivery = None
        self.server.active -= 1
        if self._buffer and not self.closed:
            self._next_request()

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)


class Delivery:
    """One relay's answer through one hand-off connection: each upstream chunk is followed and passed
    on from the upstream connection's callback (`body_data`); a break is continued in a task."""

    def __init__(self, relay: Relay, connection: HandoffConnection) -> None:
        self.relay = relay
        self.connection = connection
        self.stream: OpenStream | None = None  # the upstream stream being passed on
        self.splicer: Splicer | None = None
        self._loop = asyncio.get_running_loop()
        self._idle_limit = 0.0
        self._last_progress = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self._resuming: asyncio.Task | None = None
        self._over = False

    def start(self) -> None:
        self._follow(self.relay.stream)

    def _follow(self, stream: OpenStream) -> None:
        self.stream = stream
        self._idle_limit = stream.candidate.upstream.stream_idle_timeout
        self._last_progress = self._loop.time()
        self._idle = self._loop.call_at(self._last_progress + self._idle_limit, self._check_idle)
        for chunk in stream.head:
            if self.stream is not stream:
                return  # the answer ended within the chunks read before the hand-off
            self.body_data(chunk)
        if self.stream is stream:
            stream.response.deliver_to(self)

    # -- the upstream stream's body (BodySink)

    def body_data(self, chunk: bytes) -> None:
        if self.stream is None:
            return
        if self.splicer is not None:
            chunk = self.splicer.feed(chunk)
        follower = self.relay.follower
        if follower is None:
            self._last_progress = self._loop.time()
            self.connection.send(chunk)
            return
        chunk = follower.feed(chunk)
        if follower.progressed:
            self._last_progress = self._loop.time()
        if follower.failed:
            self.connection.send(chunk)
            self._stream_over(Outcome.IN_BAND_ERROR)
        elif follower.done:
            self.stream.mark_delivered()
            self.connection.end(chunk)
            self._answer_sent()
        else:
            self.connection.send(chunk)

    def body_end(self) -> None:
        if self.stream is None:
            return
        if self.relay.follower is None:
            self.connection.end()
            self._stream_over(Outcome.OK)
        else:
            self._stream_over(Outcome.TRUNCATED)

    def body_broken(self, error: BaseException) -> None:
        if self.stream is not None:
            logger.debug(f"llm-ha: {self.stream.record.upstream} {self.stream.record.node} cut its stream: {error}")
            self._stream_over(Outcome.STREAM_CUT)

    # -- flow control, idle limit, the client leaving

    def pause(self) -> None:
        if self.stream is not None:
            self.stream.response.pause()

    def resume(self) -> None:
        if self.stream is not None:
            self.stream.response.resume()

    def _check_idle(self) -> None:
        if self.stream is None:
            return
        due = self._last_progress + self._idle_limit
        if self._loop.time() >= due:
            self._stream_over(Outcome.STALLED)
        else:
            self._idle = self._loop.call_at(due, self._check_idle)

    def client_left(self) -> None:
        if self._resuming is not None:
            self._resuming.cancel()
        if self.stream is not None:
            self._stream_over(Outcome.CANCELLED)

    # -- ends

    def _answer_sent(self) -> None:
        """The client has the whole answer. The upstream's own end is waited for briefly (its connection
        can then be reused) before the stream is closed as OK."""
        stream = self.stream
        self._stop_watching()
        self.stream = None
        if stream.response.complete:
            stream.finish(Outcome.OK)
        else:
            drainer = _Drainer(stream, self._loop.call_later(DRAIN_AFTER_END_S, stream.finish, Outcome.OK))
            stream.response.deliver_to(drainer)
        self._end()

    def _stream_over(self, outcome: Outcome) -> None:
        stream = self.stream
        self._stop_watching()
        self.stream = None
        if outcome.broke_stream:
            stream.record.events = self.relay.answer.events if self.relay.answer else 0
        stream.finish(outcome)
        if outcome.broke_stream and not self.connection.closed:
            self.relay.breaks.append((stream, outcome))
            self._resuming = asyncio.create_task(self._after_break(stream, outcome))
        else:
            self._end()

    def _stop_watching(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _end(self) -> None:
        if not self._over:
            self._over = True
            self.connection.delivered()

    async def _after_break(self, broken: OpenStream, outcome: Outcome) -> None:
        try:
            continuation = await self._continue(broken, outcome)
        except asyncio.CancelledError:
            continuation = None
        except Exception:
            logger.exception("llm-ha: continuing a broken stream failed")
            self.connection.abort()
            continuation = None
        finally:
            self._resuming = None
        if continuation is None:
            self._end()
        elif self.connection.closed:  # the client left while the continuation was sought
            continuation.finish(Outcome.CANCELLED)
            self._end()
        else:
            self.relay.stream = continuation
            follower = self.relay.follower
            self.splicer = Splicer(follower.protocol, follower.answer) if follower else None
            self._follow(continuation)

    async def _continue(self, broken: OpenStream, outcome: Outcome) -> OpenStream | None:
        """After a break: end a whole answer properly, continue a partial one, or pass the break on."""
        relay, connection = self.relay, self.connection
        answer = relay.answer
        where = f"{broken.record.upstream} {broken.record.node}"
        chunks = f"{answer.events} events" if answer else "its first bytes"
        if answer is not None and answer.complete:  # only the closing marker was missing
            connection.end(relay.follower.protocol.end_marker if relay.follower else b"")
            return None
        continuation = await relay.resume(relay, broken, outcome) if relay.resume and answer else None
        if continuation is not None:
            connection.send(splice_comment(
                f"llm-ha: {where} {outcome.value} after {chunks}; resumed on "
                f"{continuation.record.upstream} {continuation.record.node}"))
            return continuation
        logger.info(f"llm-ha: {where} broke its stream ({outcome.value} after {chunks})"
                    + (f"; not resumed: {relay.why_not_resumed}" if relay.why_not_resumed else ""))
        if relay.follower is not None:
            why = f": {relay.why_not_resumed}" if relay.why_not_resumed else ""
            connection.send(relay.follower.protocol.error_event(
                f"llm-ha: the stream from {broken.record.upstream} broke ({outcome.value} after {chunks}) "
                f"and could not be continued{why}", f"stream_{outcome.value}"))
        connection.abort()  # the client must see a broken stream, not a clean end
        return None


class _Drainer:
    """Reads an upstream's end after `[DONE]` (up to the timer) so that its connection can be reused."""

    def __init__(self, stream: OpenStream, timer: asyncio.TimerHandle) -> None:
        self.stream = stream
        self.timer = timer

    def body_data(self, data: bytes) -> None:
        pass

    def body_end(self) -> None:
        self.timer.cancel()
        self.stream.finish(Outcome.OK)

    def body_broken(self, error: BaseException) -> None:
        self.body_end()


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def _discard(parcel: Parcel) -> None:
    if isinstance(parcel, Relay):
        parcel.stream.finish(Outcome.CANCELLED)


_BODY_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
_BODY_HEAD_TO_CLOSE = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"  # an HTTP/1.0 request: no chunks


def answer_head(parcel: Parcel) -> tuple[int, bytes, list[tuple[str, str]]]:
    """The head the client gets for `parcel`: status, reason and headers, without this hop's framing
    (a whole answer gets its own length)."""
    if isinstance(parcel, CompleteAnswer):
        headers = [(k, v) for k, v in parcel.headers if k.lower() not in _FRAMING]
        return parcel.status, _reason_phrase(parcel.status), [*headers, ("content-length", str(len(parcel.body)))]
    stream = parcel.stream
    headers = [(k, v) for k, v in [*stream.headers, *parcel.extra_headers] if k.lower() not in _FRAMING]
    return stream.status, stream.reason, headers


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
