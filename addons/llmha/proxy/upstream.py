"""HTTP/1.1 to the upstream nodes on asyncio's own transports: the gate's client, without httpx.

An answer's bytes pass: the socket → `data_received` → a small body decoder → the reader waiting in
`chunks()`, which takes everything that arrived since it last asked (chunks waiting are coalesced).
That is the whole per-chunk cost on this side; httpx spent several layers (httpcore, anyio, h11) and
two epoll registrations per read on the same work. The response head is parsed here too: it is on
the way to every first token, and mitmproxy's reader builds a whole `Response` for it (10x the time).

Kept-alive connections are pooled per origin; a request whose pooled connection turns out to be dead
before any byte of the answer is sent again once on a fresh one. https uses the ssl module with the
certifi roots. In mitmproxy's upstream mode an http target is asked in absolute form through the proxy,
an https one through a CONNECT tunnel.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
PAUSE_ABOVE_BYTES = 4 * 1024 * 1024  # stop reading the socket while this much waits unread
IDLE_KEPT = 64  # idle connections kept per origin
IDLE_EXPIRY_S = 5.0  # an idle connection is closed after this long (httpx's default keep-alive expiry)
_NO_BODY_STATUSES = {204, 304}


class UpstreamError(OSError):
    """The upstream could not be reached or broke the exchange."""


class ConnectFailed(UpstreamError):
    pass


class ConnectionBroken(UpstreamError):
    pass


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        return cls(scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class UpstreamClient:
    def __init__(self, proxy: str | None = None) -> None:
        self.proxy = Origin.of(proxy) if proxy else None
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._open: set[_Connection] = set()

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send a request; returns once the response head has arrived (the body is read with `chunks`)."""
        origin, target = _origin_and_target(url)
        if self.proxy and origin.scheme == "http":
            target = f"http://{origin.authority}{target}"  # absolute form, through the upstream proxy
        request = _request_bytes(method, target, origin, headers, body)
        conn = self._reusable(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, request, method)
            except ConnectionBroken:
                if conn.answered_bytes:
                    raise
                conn.close()  # a kept-alive connection the server had closed: once more, fresh
        conn = await self._connect(origin)
        return await self._exchange(conn, request, method)

    async def _exchange(self, conn: _Connection, request: bytes, method: str) -> UpstreamResponse:
        try:
            return await conn.exchange(request, method)
        except BaseException:  # failed, timed out or cancelled before the head: the upstream must see us go
            conn.close()
            raise

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    def _reusable(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            conn.stop_expiry()
            if conn.usable:
                return conn
        return None

    def _keep(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, deque())
        if len(idle) < IDLE_KEPT:
            idle.append(conn)
            conn.expire_after(IDLE_EXPIRY_S, lambda: self._expire(conn))
        else:
            conn.close()

    def _expire(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            conn.close()

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        via = self.proxy or origin
        tls = origin.scheme == "https"
        conn = _Connection(origin, self)
        try:
            if self.proxy and tls:
                await loop.create_connection(lambda: conn, via.host, via.port)
                await conn.tunnel(origin, self._ssl_context())
            else:
                await loop.create_connection(lambda: conn, via.host, via.port,
                                             ssl=self._ssl_context() if tls and not self.proxy else None,
                                             server_hostname=origin.host if tls and not self.proxy else None)
        except (OSError, ssl.SSLError) as e:
            conn.close()
            raise ConnectFailed(f"cannot connect to {via.authority}: {e}") from e
        except BaseException:
            conn.close()
            raise
        self._open.add(conn)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            import certifi  # a dependency of mitmproxy
            self._ssl = ssl.create_default_context(cafile=certifi.where())
        return self._ssl


class Headers:
    """A response's headers, in order, looked up without regard to case (the part of httpx's the gate uses)."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.fields if k.lower() == name), default)

    def get_list(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.fields if k.lower() == name]

    def multi_items(self) -> list[tuple[str, str]]:
        return list(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value


class BodySink(Protocol):
    """Takes a body as it arrives, called from the connection's own callbacks (see `deliver_to`)."""

    def body_data(self, data: bytes) -> None: ...

    def body_end(self) -> None: ...

    def body_broken(self, error: BaseException) -> None: ...


class UpstreamResponse:
    """A response whose head has arrived; the body is read as it comes (httpx's names, where they exist)."""

    def __init__(self, conn: _Connection, status: int, reason: bytes, headers: list[tuple[str, str]]) -> None:
        self._conn = conn
        self.status_code = status
        self.reason = reason
        self.headers = Headers(headers)
        self.is_closed = False
        self._decode = _decoder(self.headers.get("content-encoding", ""))

    @property
    def reason_phrase(self) -> str:
        return self.reason.decode("latin-1", "replace")

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's data as it arrives, its framing removed; ConnectionBroken if it is cut."""
        while True:
            data = await self._conn.body_data()
            if data is None:
                return
            yield data

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives, its content-encoding (gzip, deflate, br) undone too."""
        async for data in self.aiter_raw():
            data = self._decode(data) if self._decode else data
            if data:
                yield data

    def deliver_to(self, sink: BodySink) -> None:
        """From now on, hand the rest of the body (decoded) to `sink` as it arrives, from the connection's
        `data_received`: no task between the socket and the sink. What arrived unread goes first."""
        self._conn.attach(sink, self._decode)

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._conn._ended

    def pause(self) -> None:
        """Stop reading the upstream (the sink cannot pass more on for now)."""
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    def finish(self) -> None:
        """Done with this response: its connection is kept for reuse if the body was read to the end."""
        if not self.is_closed:
            self.is_closed = True
            self._conn.finish()

    async def aclose(self) -> None:
        self.finish()


class _Connection(asyncio.Protocol):
    """One connection to one origin; one exchange at a time."""

    def __init__(self, origin: Origin, client: UpstreamClient) -> None:
        self.origin = origin
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.answered_bytes = False
        self._head = bytearray()
        self._body: _Body | None = None
        self._data: deque[bytes] = deque()
        self._queued = 0
        self._ended = False  # the current response's body is complete
        self._lost: BaseException | None = None
        self._closed = False
        self._reuse = False
        self._waiter: asyncio.Future | None = None
        self._method = "GET"
        self._response: _ResponseHead | None = None
        self._tunnel = False
        self._expiry: asyncio.TimerHandle | None = None
        self._sink: BodySink | None = None
        self._decode: Callable[[bytes], bytes] | None = None
        self._paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.answered_bytes = True
        if self._tunnel:
            self._head += data
            self._wake()
            return
        if self._body is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD_BYTES:
                    self._fail(ConnectionBroken("response head too large"))
                self._wake()
                return
            data = bytes(self._head[end + 4:])
            try:
                self._response = _ResponseHead.parse(bytes(self._head[:end]))
                self._body = _Body.for_response(self._response.status, self._response.headers, self._method)
            except ValueError as e:
                self._fail(ConnectionBroken(f"bad response head: {e}"))
                return
            if not data and not self._body.done:
                self._wake()
                return
        try:
            out = self._body.feed(data)
        except ValueError as e:
            self._fail(ConnectionBroken(f"bad response body framing: {e}"))
            return
        if self._sink is not None:
            self._to_sink(out)
            return
        if out:
            self._data.append(out)
            self._queued += len(out)
            if self._queued > PAUSE_ABOVE_BYTES:
                self.pause()
        if self._body.done:
            self._ended = True
        self._wake()

    def eof_received(self) -> bool:
        if self._body is not None and self._body.until_close:
            self._ended = True
        self._lost = self._lost or ConnectionBroken("the upstream closed the connection")
        self._wake()
        self._sink_ends()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._body is not None and self._body.until_close and exc is None:
            self._ended = True
        self._lost = self._lost or ConnectionBroken(f"connection lost: {exc or 'closed by the upstream'}")
        self.client._open.discard(self)
        self._wake()
        self._sink_ends()

    # -- one exchange

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, request: bytes, method: str) -> UpstreamResponse:
        self._method = method
        self._head.clear()
        self._body, self._ended, self._lost, self.answered_bytes = None, False, None, False
        self._sink, self._decode = None, None
        self._data.clear()
        self._queued = 0
        self.transport.write(request)
        while self._body is None:
            await self._wait()
        head = self._response
        self._reuse = self._body.reusable and not _says_close(head.version, head.headers.fields)
        return UpstreamResponse(self, head.status, head.reason, head.headers.fields)

    async def body_data(self) -> bytes | None:
        """The data received since the last call; None once the body is complete."""
        while not self._data:
            if self._ended:
                return None
            await self._wait()
        data = self._data.popleft() if len(self._data) == 1 else b"".join(self._data)
        self._data.clear()
        if self._queued > PAUSE_ABOVE_BYTES:
            self.resume()
        self._queued = 0
        return data

    # -- the body handed to a sink

    def attach(self, sink: BodySink, decode: Callable[[bytes], bytes] | None) -> None:
        self._decode = decode
        waiting = b"".join(self._data)
        self._data.clear()
        self._queued = 0
        self._sink = sink
        if waiting:
            self._to_sink(waiting)
        elif self._ended or self._lost is not None:
            self._sink_ends()
        if self._paused:
            self.resume()

    def _to_sink(self, out: bytes) -> None:
        """Body data (its framing removed) to the sink, content-encoding undone."""
        sink = self._sink
        try:
            decoded = self._decode(out) if self._decode and out else out
        except Exception as e:  # a corrupt gzip stream
            self._fail(ConnectionBroken(f"bad content-encoding: {e}"))
            return
        if self._body is not None and self._body.done:
            self._ended = True
        if decoded:
            sink.body_data(decoded)
        if self._sink is not None and (self._ended or self._lost is not None):
            self._sink_ends()

    def _sink_ends(self) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        if self._ended:
            sink.body_end()
        else:
            sink.body_broken(self._lost or ConnectionBroken("connection lost"))

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def finish(self) -> None:
        """The caller is done with the response: keep the connection if its body was read to the end."""
        self._sink = None
        if self._paused:
            self.resume()
        if self._ended and self._reuse and self.usable and not self._data:
            self.client._keep(self)
        else:
            self.close()

    def expire_after(self, seconds: float, expire) -> None:
        self._expiry = asyncio.get_running_loop().call_later(seconds, expire)

    def stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def close(self) -> None:
        self.stop_expiry()
        self._closed = True
        if self.transport is not None:
            self.transport.abort() if not self._ended else self.transport.close()
        self.client._open.discard(self)

    async def tunnel(self, origin: Origin, context: ssl.SSLContext) -> None:
        """CONNECT through the upstream proxy, then TLS to the origin inside the tunnel."""
        self._tunnel = True
        self.transport.write(f"CONNECT {origin.host}:{origin.port} HTTP/1.1\r\nhost: {origin.host}:{origin.port}"
                             f"\r\n\r\n".encode())
        while b"\r\n\r\n" not in self._head:
            await self._wait()
        status = self._head.split(b" ", 2)[1] if self._head.count(b" ") >= 2 else b""
        self._tunnel = False
        self._head.clear()
        if status != b"200":
            raise ConnectFailed(f"the upstream proxy refused CONNECT {origin.authority}: {status.decode()}")
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, context, server_hostname=origin.host)

    # -- waiting

    async def _wait(self) -> None:
        if self._lost is not None and not self._data and not self._ended:
            raise self._lost
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._lost is not None and not self._data and not self._ended:
            raise self._lost

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._lost = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()


@dataclass
class _ResponseHead:
    version: str
    status: int
    reason: bytes
    headers: Headers

    @classmethod
    def parse(cls, head: bytes) -> _ResponseHead:
        """`HTTP/1.1 200 OK` and the header lines after it (without the blank line); ValueError if malformed."""
        status_line, *lines = head.split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        status, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status) != 3 or not status.isdigit():
            raise ValueError(f"bad status line {status_line[:100]!r}")
        fields = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ValueError(f"bad header line {line[:100]!r}")
            fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return cls(version.decode(), int(status), reason, Headers(fields))


@dataclass
class _Body:
    """Removes one response body's framing: chunked, a content-length, or up to the close."""

    chunked: bool = False
    remaining: int = 0  # content-length bytes left, or the current chunk's
    until_close: bool = False
    done: bool = False
    _state: str = "size"
    _buffer: bytes = field(default=b"", repr=False)

    @classmethod
    def for_response(cls, status: int, headers, method: str) -> _Body:
        if method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
            return cls(done=True)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return cls(chunked=True)
        if "content-length" in headers:
            length = int(headers["content-length"])
            return cls(remaining=length, done=length == 0)
        return cls(until_close=True)

    @property
    def reusable(self) -> bool:
        return not self.until_close

    def feed(self, data: bytes) -> bytes:
        if self.until_close:
            return data
        if not self.chunked:
            data = data[:self.remaining]
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        return self._dechunk(data)

    def _dechunk(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        i, n = 0, len(buffer)
        while i < n and not self.done:
            if self._state == "data":
                take = min(self.remaining, n - i)
                out.append(buffer[i:i + take])
                i += take
                self.remaining -= take
                if self.remaining:
                    break
                self._state = "crlf"
                continue
            end = buffer.find(b"\r\n", i)
            if end < 0:
                if n - i > 4096:
                    raise ValueError("chunk size line too long")
                break
            line, i = buffer[i:end], end + 2
            if self._state == "crlf":
                if line:
                    raise ValueError("no CRLF after a chunk")
                self._state = "size"
            elif self._state == "size":
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                self._state, self.remaining = ("trailers", 0) if size == 0 else ("data", size)
            elif not line:  # the empty line after the trailers: the end
                self.done = True
        self._buffer = buffer[i:]
        return out[0] if len(out) == 1 else b"".join(out)


def _decoder(encoding: str):
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        import zlib
        return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress  # gzip or zlib header, detected
    if encoding == "br":
        import brotli  # a dependency of mitmproxy
        return brotli.Decompressor().process
    return None


@functools.lru_cache(maxsize=1024)
def _origin_and_target(url: str) -> tuple[Origin, str]:
    """Where `url` is asked, and what for: its origin and its path with the query string (a node's URL and
    an API path, the same few again and again)."""
    parts = urlsplit(url)
    return Origin.of(url), (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _request_bytes(method: str, target: str, origin: Origin, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"host: {origin.authority}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "content-length", "transfer-encoding")]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _says_close(http_version: str, headers: list[tuple[str, str]]) -> bool:
    connection = ",".join(v for k, v in headers if k.lower() == "connection").lower()
    if http_version == "HTTP/1.0":
        return "keep-alive" not in connection
    return "close" in connection

