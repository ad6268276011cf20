"""The hand-off in-process: a real upstream server and client, the real gate, and the hand-off server
fetched the way mitmproxy fetches it (`asyncio.open_connection`, in memory), and over loopback TCP."""

import asyncio
import contextlib
import json
import socket
import zlib
from dataclasses import dataclass

import pytest

from llmha.core.candidates import CandidatePicker
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.splice import StreamFollower
from llmha.proxy.gate import CompleteAnswer, Gate, LlmRequest
from llmha.proxy.handoff import HandoffServer, Relay, answer_head
from llmha.proxy.httpserver import HttpServer
from llmha.proxy.pipe import connect_pair
from llmha.proxy.upstream import UpstreamClient

EVENTS = 50


def chunk(i: int) -> bytes:
    return b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i


class Upstream_:
    """An SSE server: EVENTS events, then [DONE]; `cut_after` resets the connection after that many."""

    def __init__(self, cut_after: int | None = None, gap: float = 0.0, gzip: bool = False) -> None:
        self.cut_after, self.gap, self.gzip = cut_after, gap, gzip
        self.server = HttpServer(self.serve)

    async def serve(self, request, responder) -> None:
        encoder = zlib.compressobj(wbits=31) if self.gzip else None  # despite the gate's `accept-encoding: identity`

        def encoded(data: bytes) -> bytes:
            return encoder.compress(data) + encoder.flush(zlib.Z_SYNC_FLUSH) if encoder else data

        await responder.start(200, [("content-type", "text/event-stream"),
                                    *([("content-encoding", "gzip")] if self.gzip else [])])
        for i in range(EVENTS):
            if self.cut_after is not None and i == self.cut_after:
                responder.abort()
                return
            await responder.send(encoded(chunk(i)))
            if self.gap:
                await asyncio.sleep(self.gap)
        await responder.send(encoded(b"data: [DONE]\n\n") + (encoder.flush() if encoder else b""))


@dataclass
class Served:
    relay: Relay
    pool: NodePool
    handoff: HandoffServer

    @property
    def inflight(self) -> int:
        return self.pool[next(iter(self.pool.nodes))].inflight


@contextlib.asynccontextmanager
async def served(upstream: Upstream_):
    """A stream opened by the real gate on `upstream`, parked in a started hand-off server; all stopped after."""
    await upstream.server.start()
    profile = Profile(path="h.yaml", upstreams=(Upstream("primary", (upstream.server.url,), first_byte_timeout=2.0),))
    pool = NodePool(profile, 0.0)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    request = LlmRequest.parse_body("POST", "/v1/chat/completions", [], body)
    client = UpstreamClient()
    handoff = HandoffServer()
    try:
        result = await Gate(pool, client).run(request, CandidatePicker(profile).candidates(pool, 0.0))
        assert result.stream is not None, result.attempts
        relay = Relay(result.stream, [("x-llm-ha-upstream", "primary")])
        relay.follower = StreamFollower(request.protocol, lazy=True)
        await handoff.start()
        yield Served(relay, pool, handoff)
    finally:
        await handoff.stop()
        await upstream.server.stop()
        await client.aclose()


async def fetch(handoff: HandoffServer, path: str, tcp: bool) -> tuple[bytes, bool]:
    """GET the hand-off as mitmproxy does; (what arrived, whether the connection ended cleanly)."""
    if tcp:  # an explicit socket bypasses the in-memory shortcut, as an event loop without it would
        sock = socket.create_connection(("127.0.0.1", handoff.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", handoff.port)
    writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode())
    received, clean = b"", True
    try:
        while not received.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                clean = False
                break
            received += data
    except ConnectionError:
        clean = False
    writer.close()
    return received, clean


def sse_body(received: bytes) -> bytes:
    """The chunked body's data."""
    head, _, body = received.partition(b"\r\n\r\n")
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


@pytest.mark.parametrize("tcp", [False, True], ids=["in-memory", "tcp"])
def test_a_whole_stream_is_delivered_and_its_lease_released_ok(tcp):
    async def main():
        async with served(Upstream_()) as s:
            assert s.handoff.in_memory
            received, clean = await fetch(s.handoff, s.handoff.register(s.relay), tcp)
            await asyncio.sleep(0.05)
            assert clean
            assert received.partition(b"\r\n\r\n")[0] == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked"  # framing only
            status, _, headers = answer_head(s.relay)  # the flow's head, set in `responseheaders`
            assert status == 200 and ("x-llm-ha-upstream", "primary") in headers
            body = sse_body(received)
            assert body.count(b"data: ") == EVENTS + 1 and body.endswith(b"data: [DONE]\n\n")
            assert s.inflight == 0 and s.handoff.active == 0 and s.handoff.pending == 0
            assert s.relay.stream.record.outcome == "ok"
            assert s.handoff.in_memory_connections == (0 if tcp else 1)

    asyncio.run(main())


def test_a_compressed_stream_that_arrived_before_the_fetch_is_delivered_decoded():
    """What the upstream sent while the stream waited to be fetched is decoded like the rest."""
    async def main():
        async with served(Upstream_(gzip=True)) as s:
            path = s.handoff.register(s.relay)
            await asyncio.sleep(0.2)  # the whole answer arrives and waits, still compressed
            received, clean = await fetch(s.handoff, path, tcp=False)
            body = sse_body(received)
            assert clean and not [k for k, _ in answer_head(s.relay)[2] if k.lower() == "content-encoding"]
            assert body.count(b"data: ") == EVENTS + 1 and body.endswith(b"data: [DONE]\n\n")

    asyncio.run(main())


@pytest.mark.parametrize("tcp", [False, True], ids=["in-memory", "tcp"])
def test_a_cut_stream_that_cannot_resume_ends_with_an_error_event_and_a_broken_connection(tcp):
    async def main():
        async with served(Upstream_(cut_after=10)) as s:
            received, clean = await fetch(s.handoff, s.handoff.register(s.relay), tcp)
            await asyncio.sleep(0.05)
            assert not clean
            assert b"stream_stream_cut" in received
            assert s.inflight == 0 and s.handoff.active == 0
            assert s.relay.breaks and s.relay.breaks[0][1].value == "stream_cut"

    asyncio.run(main())


def test_a_client_that_leaves_mid_stream_releases_the_lease_as_cancelled():
    async def main():
        async with served(Upstream_(gap=0.02)) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.handoff.port)
            writer.write(f"GET {s.handoff.register(s.relay)} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            await reader.read(100)
            writer.close()
            for _ in range(100):
                if s.handoff.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert s.handoff.active == 0 and s.inflight == 0
            assert s.relay.stream.released and s.relay.stream.record.outcome == "ok"  # not the node's failure

    asyncio.run(main())


def test_a_request_for_an_answer_still_being_gated_gets_the_head_at_once_and_the_body_once_given():
    """mitmproxy asks before the gate has the first token: it has the hop's head at once (and can run its
    `responseheaders` hook meanwhile), the body once the answer is given, however long after `claim_timeout`."""
    async def main():
        async with served(Upstream_()) as s:
            s.handoff.claim_timeout = 0.05  # drops tokens nobody asked for, not one being waited for
            path = s.handoff.reserve()
            reader, writer = await asyncio.open_connection("127.0.0.1", s.handoff.port)
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            await asyncio.sleep(0.2)
            assert s.handoff.pending == 1
            s.handoff.fulfil(path, s.relay)
            received = head
            while not received.endswith(b"0\r\n\r\n"):
                received += await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
            assert sse_body(received).endswith(b"data: [DONE]\n\n")
            assert s.handoff.pending == 0 and s.relay.stream.record.outcome == "ok"

    asyncio.run(main())


def test_a_whole_answer_is_the_body_its_head_has_its_own_length_and_the_connection_serves_on():
    async def main():
        handoff = HandoffServer()
        await handoff.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", handoff.port)
        for status in (429, 502):
            path = handoff.reserve()
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            await asyncio.sleep(0.01)
            answer = CompleteAnswer(status, [("content-type", "application/json"), ("content-length", "999")],
                                    b'{"error": {}}')
            handoff.fulfil(path, answer)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            assert await reader.readuntil(b"0\r\n\r\n") == b'd\r\n{"error": {}}\r\n0\r\n\r\n'
            assert answer_head(answer) == (status, b"Too Many Requests" if status == 429 else b"Bad Gateway",
                                           [("content-type", "application/json"), ("content-length", "13")])
            assert handoff.pending == 0
        writer.close()
        await handoff.stop()

    asyncio.run(main())


def test_an_answer_nobody_waits_for_any_more_is_abandoned_or_closed():
    """The connection that asked was lost: the gate is stopped; an answer given after that is closed."""
    async def main():
        async with served(Upstream_(gap=0.02)) as s:
            abandoned = []
            path = s.handoff.reserve(lambda: abandoned.append(True))
            reader, writer = await asyncio.open_connection("127.0.0.1", s.handoff.port)
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            await asyncio.sleep(0.05)
            writer.close()
            await asyncio.sleep(0.05)
            assert abandoned == [True] and s.handoff.pending == 0
            s.handoff.fulfil(path, s.relay)  # the gate had it already
            assert s.relay.stream.released and s.inflight == 0

    asyncio.run(main())


def test_an_unknown_token_is_answered_410_and_the_connection_serves_on():
    async def main():
        handoff = HandoffServer()
        await handoff.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", handoff.port)
        for _ in range(2):
            writer.write(b"GET /llm-ha/handoff/nothing HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 410") and b"handoff_expired" in body
        writer.close()
        await handoff.stop()

    asyncio.run(main())


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data, self.eof, self.lost, self.transport = b"", False, "open", None
        self.paused = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc) -> None:
        self.lost = type(exc).__name__ if exc else "closed"

    def pause_writing(self) -> None:
        self.paused += 1


def test_the_pipe_keeps_order_across_pauses_and_closes_like_a_socket():
    async def main():
        a, b = Collect(), Collect()
        a_end = connect_pair(a, b, ("127.0.0.1", 1))
        b_end = b.transport
        a_end.write(b"one")
        assert b.data == b"one"  # handed over in the same call
        b_end.pause_reading()
        assert a.paused == 1
        a_end.write(b"two")
        a_end.close()
        assert b.data == b"one"
        await asyncio.sleep(0)
        assert b.lost == "open"  # the end waits behind the data
        b_end.resume_reading()
        assert b.data == b"onetwo"
        for _ in range(3):
            await asyncio.sleep(0)
        assert b.eof and b.lost == "closed" and a.lost == "closed"

        c, d = Collect(), Collect()
        c_end = connect_pair(c, d, ("127.0.0.1", 2))
        c_end.abort()
        await asyncio.sleep(0)
        assert d.lost == "ConnectionResetError" and not d.eof

    asyncio.run(main())


class Pausing(Collect):
    """Reads like asyncio's StreamReader: pauses its transport once it holds more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.resumed = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if len(self.data) > self.limit:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.resumed += 1


def test_a_reader_that_pauses_again_while_taking_its_backlog_keeps_the_writer_paused():
    """Backpressure: the hand-off (writer) must stay paused while mitmproxy (reader) cannot take more, or a slow
    client would let the upstream fill memory."""
    async def main():
        reader, writer = Pausing(limit=10), Pausing(limit=10**9)
        reader_end = connect_pair(reader, writer, ("127.0.0.1", 3))
        writer_end = writer.transport
        writer_end.write(b"x" * 11)  # over the limit: the reader pauses, the writer is asked to stop
        assert reader.paused == 0 and writer.paused == 1
        writer_end.write(b"a")
        writer_end.write(b"b")
        assert reader.data == b"x" * 11  # held for the reader
        reader.data = b""  # it reads its buffer...
        reader_end.resume_reading()  # ...and resumes: "a" is taken; still under the limit, so "b" too
        assert reader.data == b"ab" and writer.resumed == 1
        reader.limit = 0
        writer_end.write(b"c")  # pauses again
        assert writer.paused == 2
        writer_end.write(b"d")
        writer_end.write(b"e")
        reader.data = b""
        reader_end.resume_reading()  # "d" goes in and pauses it again: "e" waits, the writer stays paused
        assert reader.data == b"d" and writer.resumed == 1 and writer.paused == 3

    asyncio.run(main())
