"""An upstream that sends `data: [DONE]` and only later ends its HTTP message, as real servers may.

    with LingeringUpstream(linger=0.3) as upstream:
        ...  # upstream.url answers every POST with a short chat-completion stream
"""

from __future__ import annotations

import json
import socket
import threading
import time


class LingeringUpstream:
    def __init__(self, linger: float = 0.3, events: int = 6) -> None:
        self.linger = linger
        self.events = events
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> LingeringUpstream:
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
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"connection: close\r\n\r\n")
            for i in range(self.events):
                delta = {"role": "assistant", "content": "w0"} if i == 0 else {"content": f" w{i}"}
                finish = "stop" if i == self.events - 1 else None
                event = {"id": "chatcmpl-l", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                conn.sendall(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            conn.sendall(_chunk(b"data: [DONE]\n\n"))
            time.sleep(self.linger)  # the end of the HTTP message comes later
            conn.sendall(b"0\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
