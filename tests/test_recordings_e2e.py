"""Recordings keep every streamed answer whole, whatever the client does after `[DONE]`.

Three clients: the openai SDK's synchronous client (it closes its connection as soon as it has read
`[DONE]`), its async client, and a raw socket that hangs up the moment `[DONE]` arrives.
"""

import asyncio
import json
import socket

import httpx
import openai
import pytest
from mitmproxy import io as flow_io
from test_replay import SERVER_REPLAY, background, mitmdump  # noqa: F401 - `background` is a fixture

from llmsim.control import free_port
from support.scripted import ScriptedUpstream, chat_chunk

pytestmark = pytest.mark.e2e
N = 12


def ask(n: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"question {n}"}], "max_tokens": 8}


def sync_client(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=20)
    for n in range(N):
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **ask(n)))


def async_client(url: str) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=20)
        for n in range(N, 2 * N):
            stream = await client.chat.completions.create(stream=True, **ask(n))
            assert [c async for c in stream]
        await client.close()
    asyncio.run(run())


def raw_client(port: int) -> None:
    """Sends one streamed request per connection and closes the socket the moment `[DONE]` is read."""
    for n in range(2 * N, 3 * N):
        body = json.dumps({**ask(n), "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"[DONE]" not in received:
                chunk = sock.recv(65536)
                assert chunk, f"closed before [DONE]: {received!r}"
                received += chunk


def test_every_streamed_answer_is_recorded_whole_and_a_stand_in_replays_it(tmp_path, simulators, proxies, confdir,
                                                                          background):  # noqa: F811
    fallback = simulators("--preset", "fallback")
    recording = tmp_path / "traffic.flows"
    events = [chat_chunk({"role": "assistant", "content": "w0"}),
              *(chat_chunk({"content": f" w{i}"}) for i in range(1, 5)), chat_chunk({"content": " w5"}, "stop"), "[DONE]"]
    with ScriptedUpstream(events, linger=0.3) as primary:
        proxy = proxies(f"""
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
  - name: fallback
    nodes: ["{fallback.url}"]
""", reverse=primary.url, args=["-w", str(recording)])
        sync_client(proxy.url)
        async_client(proxy.url)
        raw_client(proxy.port)
        proxy.stop()

    with recording.open("rb") as f:
        flows = list(flow_io.FlowReader(f).stream())
    assert len(flows) == 3 * N
    broken = [(f.request.path, f.error and f.error.msg) for f in flows if f.error or not f.response]
    assert broken == [], "every answer that reached its client is in the recording, without an error"
    for f in flows:
        body = f.response.content
        assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 7, body
        assert f.metadata["llm_ha"]["upstream"] == "primary"
        assert f.metadata["llm_ha"]["attempts"][-1]["duration_s"] is not None

    # The recording serves as a stand-in primary (server replay) that answers with the recorded bytes.
    stand_in = free_port()
    background(mitmdump("--mode", f"reverse:http://127.0.0.1:{free_port()}", "-S", str(recording), *SERVER_REPLAY,
                        "--set", "server_replay_extra=kill", confdir=confdir, port=stand_in), stand_in)
    with httpx.Client(base_url=f"http://127.0.0.1:{stand_in}", timeout=10) as client:
        for f in flows[:: N // 2]:
            replayed = client.post(f.request.path, content=f.request.raw_content,
                                   headers={"content-type": "application/json"})
            assert replayed.status_code == 200 and replayed.content == f.response.content


@pytest.mark.parametrize("recording", [False, True], ids=["plain mitmdump", "with -w"])
def test_streamed_bodies_are_stored_only_when_something_keeps_the_flows(tmp_path, simulators, proxies, recording):
    primary = simulators("--no-physics")
    args = ["-w", str(tmp_path / "traffic.flows")] if recording else []
    proxy = proxies(f"""
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
""", reverse=primary.url, args=args)
    sync_client(proxy.url)
    proxy.stop()
    said = [line for line in proxy.output().splitlines() if "llm-ha: setting" in line]
    assert said and ("store_streamed_bodies=True" in said[0]) == recording, said
