"""A small asyncio HTTP/1.1 server on h11, for loopback use only.

It serves llm-ha's hand-off of open upstream streams to mitmproxy, the status endpoint, and the
simulators. A handler gets the whole request and a `Responder` that streams the answer chunk by
chunk, can notice that the peer went away (`disconnected`), and can cut the connection with a TCP
reset (`abort`), which the simulators use to play a crashing server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

logger = logging.getLogger(__name__)

MAX_REQUEST_BODY = 32 * 1024 * 1024


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    @property
    def path(self) -> str:
        return path_of(self.target)


def path_of(target: str) -> str:
    """A request target's path, also from an absolute-form target (`POST http://host/path`, as proxies send)."""
    if target.startswith(("http://", "https://")):
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return target.split("?", 1)[0]


@dataclass
class Responder:
    """Writes one response. `disconnected` is set when the peer closes its side."""

    _conn: h11.Connection
    _writer: asyncio.StreamWriter
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    ended: bool = False
    _chunked: bool = False

    async def start(self, status: int, headers: list[tuple[str, str]], reason: bytes = b"") -> None:
        self.started = True
        event = h11.Response(status_code=status, headers=[(k, v) for k, v in headers], reason=reason)
        await self._write(self._conn.send(event))
        # h11 frames a body without a length as chunks; the data path frames its chunks itself (the same
        # bytes, without h11's per-event work), and h11 still writes the last chunk at `end`.
        self._chunked = self._conn.their_http_version == b"1.1" and not any(
            k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)

    async def send(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            await self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            await self._write(self._conn.send(h11.Data(data=data)))

    async def end(self, last: bytes = b"") -> None:
        """End the message; `last` data goes out in the same write, so the peer sees both at once."""
        self.ended = True
        data = (b"%x\r\n%b\r\n" % (len(last), last) if self._chunked else self._conn.send(h11.Data(data=last))) \
            if last else b""
        await self._write(data + self._conn.send(h11.EndOfMessage()))

    async def respond(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        await self.send(body)
        await self.end()

    def abort(self) -> None:
        """Cut the connection with a TCP reset, as a crashing process would."""
        _reset(self._writer)
        self.disconnected.set()

    async def _write(self, data: bytes | None) -> None:
        if self.disconnected.is_set():
            raise ConnectionResetError("peer disconnected")
        if data:
            self._writer.write(data)
            await self._writer.drain()


Handler = Callable[[Request, Responder], Awaitable[None]]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP reset instead of an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _wait_closed(writers: list[asyncio.StreamWriter], timeout: float = 1.0) -> None:
    """Wait until the sockets are really closed; reset those whose peer holds up a graceful close."""

    async def closed(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    waits = {asyncio.ensure_future(closed(writer)): writer for writer in writers}
    if not waits:
        return
    _, stalled = await asyncio.wait(waits, timeout=timeout)
    for future in stalled:
        _reset(waits[future])
        future.cancel()


class HttpServer:
    """Serves `handler` on host:port; port 0 picks a free one (see `.port`)."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._busy: set[asyncio.Task] = set()  # connections inside the handler

    @property
    def port(self) -> int:
        """The listening port; while not listening, the port it last listened on."""
        if self._server is None:
            assert self._bound_port is not None, "server never started"
            return self._bound_port
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> HttpServer:
        """Listen. After `stop` or `stop_listening`, listens again on the same port as before."""
        port = self._bound_port if self._bound_port is not None else self.requested_port
        self._server = await asyncio.start_server(self._serve_connection, self.host, port)
        self._bound_port = self.port
        return self

    async def stop(self, reset: bool = False) -> None:
        """Stop listening and cut every open connection; `reset`: with a TCP reset each."""
        self._close_listener()
        connections = list(self._connections.items())
        if reset:
            for _, writer in connections:
                _reset(writer)
        for task, _ in connections:
            task.cancel()
        for task, _ in connections:
            with contextlib.suppress(BaseException):
                await task
        await _wait_closed([writer for _, writer in connections])

    async def stop_listening(self) -> None:
        """Refuse new connections and close the idle keep-alive ones; requests in progress finish.

        Closing the idle connections matters: a client's pooled connection would otherwise keep
        reaching a server that is supposed to be unreachable. Returns once they are closed.
        """
        self._close_listener()
        idle = [writer for task, writer in self._connections.items() if task not in self._busy]
        for writer in idle:
            writer.close()
        await _wait_closed(idle)

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = writer
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._serve_one(conn, reader, writer):
                conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError):
            pass
        except asyncio.CancelledError:
            # `stop`, or the proxy quitting, cut this connection. End quietly: on Python 3.12.0-3.12.1
            # asyncio prints a traceback for a cancelled connection task (CPython gh-113538).
            pass
        finally:
            self._connections.pop(task, None)
            self._busy.discard(task)
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _serve_one(self, conn: h11.Connection, reader, writer) -> bool:
        request = await _read_request(conn, reader)
        if request is None:
            return False
        task = asyncio.current_task()
        self._busy.add(task)
        try:
            return await self._handle(request, conn, reader, writer)
        finally:
            self._busy.discard(task)

    async def _handle(self, request: Request, conn: h11.Connection, reader, writer) -> bool:
        responder = Responder(conn, writer)
        watcher = asyncio.create_task(_watch_disconnect(conn, reader, responder.disconnected))
        try:
            await self.handler(request, responder)
            if responder.started and not responder.ended and not responder.disconnected.is_set():
                await responder.end()
            if not responder.started and not responder.disconnected.is_set():
                await responder.respond(500, b"handler sent no response")
        except ConnectionError:
            return False
        except Exception:
            logger.exception(f"error serving {request.method} {request.path}")
            if responder.started:
                return False
            await responder.respond(500, b"internal error\n")
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        return (
            not responder.disconnected.is_set()
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        )


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
    request: Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data and conn.their_state is h11.IDLE:
                return None
            continue
        if isinstance(event, h11.Request):
            request = Request(
                method=event.method.decode(),
                target=event.target.decode(),
                headers=[(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers],
            )
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise h11.ProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            request.body = bytes(body)
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _watch_disconnect(conn: h11.Connection, reader: asyncio.StreamReader, disconnected: asyncio.Event):
    """Read on while the response is written: EOF or a reset means the client went away."""
    while True:
        try:
            data = await reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            disconnected.set()
            return
        conn.receive_data(data)  # a pipelined next request; h11 buffers it
