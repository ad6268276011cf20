"""An upstream that streams given SSE events, then does what the test says: cut, hang, or end cleanly
(optionally `linger` seconds after its last event before the end of the HTTP message, as real servers
may after `data: [DONE]`).

    with ScriptedUpstream(events, then="reset") as upstream:
        ...  # upstream.url; upstream.requests: the request bodies it received
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time


class ScriptedUpstream:
    def __init__(self, events: list[dict | str], then: str = "end", linger: float = 0.0) -> None:
        self.events = events
        self.then = then  # end | reset | hang
        self.linger = linger
        self.requests: list[dict] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(json.loads(body or b"{}"))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in self.events:
            data = event if isinstance(event, str) else json.dumps(event)
            conn.sendall(_chunk(f"data: {data}\n\n".encode()))
            if event != "[DONE]":
                time.sleep(0.005)
        if self.then == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        elif self.then == "hang":
            self._stop.wait(30)
            conn.close()
        else:
            time.sleep(self.linger)
            conn.sendall(b"0\r\n\r\n")
            conn.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chat_chunk(delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
