"""Connections inside the process: mitmproxy reaches the hand-off server without a socket.

mitmproxy opens every server connection with `asyncio.open_connection(host, port)`. `Shortcut`
answers the event loop's `create_connection` for one address (the hand-off server's) with an
in-memory pair of transports instead of a TCP connection on loopback: what one side writes is the
other side's `data_received`, in the same call. A streamed chunk then costs what it costs between
mitmproxy and a real upstream (one wake-up of mitmproxy's reader) instead of a loopback send, an
epoll round and a second read. Every other address, and a loop that cannot be given the shortcut,
takes the ordinary path; the hand-off server listens on TCP as well, so it is reachable either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

Address = tuple[str, int]
_local_ports = itertools.count(1)


class PipeEnd(asyncio.Transport):
    """One end of an in-memory connection; `write` hands the data to the other end's protocol."""

    def __init__(self, protocol: asyncio.BaseProtocol, sockname: Address, peername: Address) -> None:
        super().__init__({"sockname": sockname, "peername": peername, "socket": None})
        self._protocol = protocol
        self.peer: PipeEnd | None = None
        self._closing = False
        self._lost = False
        self._reading = True
        self._eof_sent = False
        self._backlog: list[bytes | Callable[[], None]] = []  # for this end while it does not read, in order

    # -- asyncio.Transport

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self.peer
        if self._closing or self._eof_sent or not data or peer is None or peer._lost:
            return
        if peer._backlog or not peer._reading:
            peer._backlog.append(bytes(data))
        else:
            peer._protocol.data_received(bytes(data))  # type: ignore[attr-defined]

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._closing:
            return
        self._eof_sent = True
        if self.peer is not None:
            self.peer._then(self.peer._eof_received)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 0, 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        """The protocol here cannot take more for now: the peer's protocol is asked to stop writing."""
        if self._reading and not self._lost:
            self._reading = False
            if self.peer is not None and not self.peer._lost:
                _call(self.peer._protocol, "pause_writing")

    def resume_reading(self) -> None:
        if self._reading or self._lost:
            return
        self._reading = True
        loop = asyncio.get_running_loop()
        while self._backlog and self._reading:  # the protocol may pause again while it takes the backlog
            item = self._backlog.pop(0)
            if isinstance(item, bytes):
                self._protocol.data_received(item)  # type: ignore[attr-defined]
            else:
                loop.call_soon(item)
        if self._reading and self.peer is not None and not self.peer._lost:
            _call(self.peer._protocol, "resume_writing")

    def is_reading(self) -> bool:
        return self._reading

    def close(self) -> None:
        """An orderly close: the peer reads what was written, then the end."""
        if self._closing:
            return
        self._closing = True
        peer = self.peer
        if peer is not None:
            if not self._eof_sent:
                peer._then(peer._eof_received)
            peer._then(lambda: peer._connection_lost(None))
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        """A reset: what the peer has not read yet is dropped; it sees the connection lost."""
        self._closing = True
        loop = asyncio.get_running_loop()
        peer = self.peer
        if peer is not None and not peer._lost:
            peer._backlog.clear()
            loop.call_soon(peer._connection_lost, ConnectionResetError("connection reset by peer"))
        loop.call_soon(self._connection_lost, None)

    # -- what the peer does to this end

    def _then(self, action: Callable[[], None]) -> None:
        """Run `action` once this end has read what was written to it before."""
        if self._lost:
            return
        if self._backlog or not self._reading:
            self._backlog.append(action)
        else:
            asyncio.get_running_loop().call_soon(action)

    def _eof_received(self) -> None:
        if self._lost:
            return
        if not _call(self._protocol, "eof_received"):
            self.close()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._backlog.clear()
        self._protocol.connection_lost(exc)


def _call(protocol: asyncio.BaseProtocol, method: str):
    with contextlib.suppress(Exception):
        return getattr(protocol, method)()
    return None


def connect_pair(client: asyncio.BaseProtocol, server: asyncio.BaseProtocol, address: Address) -> PipeEnd:
    """Connect `client` to `server` in memory, as if it had connected to `address`; returns the client's end."""
    client_address = ("127.0.0.1", next(_local_ports))
    client_end = PipeEnd(client, client_address, address)
    server_end = PipeEnd(server, address, client_address)
    client_end.peer, server_end.peer = server_end, client_end
    server.connection_made(server_end)
    client.connection_made(client_end)
    return client_end


class Shortcut:
    """Answers the running loop's `create_connection` to `address` with an in-memory connection to a
    new `server_factory()` protocol, until `remove`. A loop that takes no such shortcut (one written in
    C) is left alone: `install` says False."""

    def __init__(self, address: Address, server_factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.address = address
        self.server_factory = server_factory
        self.connections = 0  # made in memory so far
        self._routes: dict[Address, Shortcut] | None = None

    def install(self) -> bool:
        routes = _routes_of(asyncio.get_running_loop())
        if routes is None:
            logger.debug("llm-ha: this event loop takes no in-memory hand-off; streams go over loopback TCP")
            return False
        routes[self.address] = self
        self._routes = routes
        return True

    def remove(self) -> None:
        if self._routes is not None and self._routes.get(self.address) is self:
            del self._routes[self.address]
        self._routes = None

    def connect(self, protocol: asyncio.BaseProtocol) -> PipeEnd:
        self.connections += 1
        return connect_pair(protocol, self.server_factory(), self.address)


_ROUTES_ATTRIBUTE = "_llm_ha_in_memory_routes"


def _routes_of(loop: asyncio.AbstractEventLoop) -> dict[Address, Shortcut] | None:
    """The loop's table of in-memory addresses; the loop's `create_connection` is wrapped once to read it."""
    routes = getattr(loop, _ROUTES_ATTRIBUTE, None)
    if routes is not None:
        return routes
    routes = {}
    original = loop.create_connection

    async def create_connection(protocol_factory, host=None, port=None, **kwargs):
        shortcut = routes.get((host, port))
        if shortcut is None or kwargs.get("ssl") or kwargs.get("sock"):
            return await original(protocol_factory, host, port, **kwargs)
        # Yield once, as a connect does: mitmproxy records its connection after starting the task that
        # opens it, and an eager task factory would otherwise finish the opening before that.
        await asyncio.sleep(0)
        protocol = protocol_factory()
        return shortcut.connect(protocol), protocol

    try:
        loop.create_connection = create_connection  # type: ignore[method-assign]
        setattr(loop, _ROUTES_ATTRIBUTE, routes)
    except (AttributeError, TypeError):
        return None
    return routes
