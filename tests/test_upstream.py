"""The gate's HTTP/1.1 client: body framing on random splits, keep-alive reuse, breaks, a stale connection."""

import asyncio
import json
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmha.proxy.upstream import ConnectFailed, ConnectionBroken, UpstreamClient, _Body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\nx-trailer: 1\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12), st.lists(st.integers(1, 30), min_size=1, max_size=50))
def test_chunked_bodies_decode_whatever_the_reads(parts, cuts):
    wire = chunked(parts)
    body, out, i = _Body(chunked=True), [], 0
    for cut in cuts * (len(wire) // max(1, sum(cuts)) + 2):
        if i >= len(wire):
            break
        out.append(body.feed(wire[i:i + cut]))
        i += cut
    assert body.done and b"".join(out) == b"".join(parts)


def test_content_length_and_until_close_bodies():
    body = _Body(remaining=5)
    assert body.feed(b"abc") == b"abc" and not body.done
    assert body.feed(b"de and more") == b"de" and body.done
    assert _Body(until_close=True).feed(b"x") == b"x"
    with pytest.raises(ValueError):
        _Body(chunked=True).feed(b"zz\r\n")


class RawServer:
    """A server on 127.0.0.1 answering each connection with `script(conn, request_number)`."""

    def __init__(self, script) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            n = 0
            while True:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        return
                    request += data
                if not self.script(conn, n):
                    return
                n += 1


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_connections_are_reused_and_the_body_arrives_whole():
    def answer(conn, n):
        body = json.dumps({"n": n}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    server = RawServer(answer)

    async def main():
        client = UpstreamClient()
        got = []
        for _ in range(3):
            response = await client.send("POST", server.url + "/x", [], b"{}")
            got.append((response.status_code, response.reason_phrase, await response.aread()))
            await response.aclose()
        await client.aclose()
        return got

    assert run(main()) == [(200, "OK", b'{"n": 0}'), (200, "OK", b'{"n": 1}'), (200, "OK", b'{"n": 2}')]
    assert server.connections == 1


def test_a_cut_body_raises_and_a_dead_kept_alive_connection_is_replaced_once():
    def answer_then_close(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return False  # closes the kept-alive connection behind the client's back

    server = RawServer(answer_then_close)

    async def main():
        client = UpstreamClient()
        for _ in range(2):
            response = await client.send("GET", server.url + "/", [], b"")
            assert await response.aread() == b"ok"
            await response.aclose()
            await asyncio.sleep(0.1)
        await client.aclose()

    run(main())
    assert server.connections == 2

    def cut(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False

    cutter = RawServer(cut)

    async def broken():
        client = UpstreamClient()
        response = await client.send("GET", cutter.url + "/", [], b"")
        with pytest.raises(ConnectionBroken):
            await response.aread()
        await client.aclose()

    run(broken())


def test_connection_refused_is_a_connect_failure():
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def main():
        with pytest.raises(ConnectFailed):
            await UpstreamClient().send("GET", f"http://127.0.0.1:{port}/", [], b"")

    run(main())
