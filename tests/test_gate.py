"""The gate in-process, with a scripted upstream client: every outcome class, leases released once."""

import asyncio
import json

import pytest

from llmha.core.candidates import CandidatePicker
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.types import NodeId, Outcome
from llmha.proxy.gate import CompleteAnswer, Gate, LlmRequest, failure_answer, in_dialect
from llmha.proxy.upstream import ConnectFailed, ConnectionBroken, Headers

PRIMARY, FALLBACK = "http://primary:1", "http://fallback:2"
PROFILE = Profile(path="g.yaml", upstreams=(
    Upstream("primary", (PRIMARY,), first_byte_timeout=0.05, max_inflight=1),
    Upstream("fallback", (FALLBACK,), first_byte_timeout=0.5),
))
SSE = [("content-type", "text/event-stream")]
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


class Scripted:
    """One scripted answer: a status and headers, then body chunks (or an exception, or a hang)."""

    def __init__(self, status=200, headers=SSE, chunks=(CHUNK, b"data: [DONE]\n\n"), raises=None, hang=False):
        self.status_code, self.headers, self.reason_phrase = status, Headers(list(headers)), "OK"
        self.chunks, self.raises, self.hang, self.is_closed = list(chunks), raises, hang, False

    async def aiter_raw(self):
        for chunk in self.chunks:
            yield chunk

    aiter_bytes = aiter_raw

    async def aread(self) -> bytes:
        return b"".join(self.chunks)

    def finish(self) -> None:
        self.is_closed = True

    async def aclose(self) -> None:
        self.finish()


class Client:
    """Answers each URL's requests from its script, in order; records what was sent."""

    def __init__(self, **scripts: list[Scripted]) -> None:
        self.scripts = {url: list(s) for url, s in scripts.items()}
        self.sent: list[tuple[str, dict]] = []

    async def send(self, method, url, headers, body):
        base = url.split("/v1")[0]
        self.sent.append((base, dict(headers)))
        script = self.scripts[base].pop(0)
        if script.hang:
            await asyncio.sleep(3600)
        if script.raises:
            raise script.raises
        return script


def run(client: Client, stream=True, pool=None):
    pool = pool or NodePool(PROFILE, 0.0)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}).encode()
    request = LlmRequest.parse_body("POST", "/v1/chat/completions", [("authorization", "Bearer client")], body)
    gate = Gate(pool, client)
    result = asyncio.run(gate.run(request, CandidatePicker(PROFILE).candidates(pool, 0.0)))
    return result, pool


def outcomes(result) -> list[tuple[str, str]]:
    return [(a.upstream, a.outcome) for a in result.attempts]


@pytest.mark.parametrize("primary, outcome", [
    (Scripted(raises=ConnectFailed("refused")), "connect_error"),
    (Scripted(raises=ConnectionBroken("reset")), "reset"),
    (Scripted(hang=True), "timeout"),
    (Scripted(status=503, headers=[], chunks=[b"busy"]), "http_error"),
    (Scripted(status=429, headers=[("retry-after", "3")], chunks=[b"{}"]), "rate_limited"),
    (Scripted(chunks=[b'data: {"error": {"message": "overloaded"}}\n\n']), "in_band_error"),
])
def test_each_failure_fails_over_and_releases_its_lease(primary, outcome):
    result, pool = run(Client(**{PRIMARY: [primary], FALLBACK: [Scripted()]}))
    assert outcomes(result) == [("primary", outcome), ("fallback", "ok")]
    assert result.stream is not None and result.winner.upstream.name == "fallback"
    p, f = pool[NodeId("primary", PRIMARY)], pool[NodeId("fallback", FALLBACK)]
    assert (p.inflight, p.monitor.failures, f.inflight) == (0, 1, 1), "the open stream holds the fallback's lease"
    result.stream.finish(Outcome.OK)
    assert f.inflight == 0 and f.monitor.failures == 0


def test_a_client_error_goes_back_to_the_client_and_is_not_the_nodes_failure():
    result, pool = run(Client(**{PRIMARY: [Scripted(status=400, headers=[("content-type", "application/json")],
                                                     chunks=[b'{"error": {"message": "bad"}}'])]}))
    assert outcomes(result) == [("primary", "client_error")] and result.answer.status == 400
    assert pool[NodeId("primary", PRIMARY)].monitor.failures == 0


def test_every_upstream_rate_limiting_gives_a_429_with_the_shortest_retry_after():
    limited = [Scripted(status=429, headers=[("retry-after", s)], chunks=[b"{}"]) for s in ("7", "2")]
    result, _ = run(Client(**{PRIMARY: limited[:1], FALLBACK: limited[1:]}))
    assert result.answer.status == 429 and ("retry-after", "2") in result.answer.headers


def test_a_fallback_never_gets_the_clients_key():
    client = Client(**{PRIMARY: [Scripted(status=500, headers=[], chunks=[b""])], FALLBACK: [Scripted()]})
    run(client)
    assert client.sent[0][1].get("authorization") == "Bearer client"
    assert "authorization" not in client.sent[1][1]


def test_a_node_at_its_limit_is_shed_not_tried():
    pool = NodePool(PROFILE, 0.0)
    held = pool.try_acquire(NodeId("primary", PRIMARY), 0.0, streamed=True)
    client = Client(**{PRIMARY: [], FALLBACK: [Scripted()]})
    result, _ = run(client, pool=pool)
    assert outcomes(result) == [("fallback", "ok")] and pool[NodeId("primary", PRIMARY)].shed == 1
    held.release(Outcome.OK, 1.0)


def test_a_cancelled_gate_releases_its_lease_without_blaming_the_node():
    pool = NodePool(PROFILE, 0.0)
    client = Client(**{PRIMARY: [Scripted(hang=True)]})
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    request = LlmRequest.parse_body("POST", "/v1/chat/completions", [], body)

    async def main():
        task = asyncio.ensure_future(Gate(pool, client).run(request, CandidatePicker(PROFILE).candidates(pool, 0.0)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    node = pool[NodeId("primary", PRIMARY)]
    assert (node.inflight, node.monitor.requests, node.monitor.failures) == (0, 0, 0)


def test_llm_has_own_errors_speak_the_clients_api():
    failed = failure_answer([])  # 503, nothing to try
    anthropic = json.loads(in_dialect(failed, "anthropic").body)
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "overloaded_error"
    assert anthropic["error"]["message"].startswith("llm-ha:")
    assert json.loads(in_dialect(failed, "ollama").body) == {"error": json.loads(failed.body)["error"]["message"]}
    assert in_dialect(failed, "openai") is failed
    upstreams_own = CompleteAnswer(400, [], b'{"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}')
    assert in_dialect(upstreams_own, "anthropic") is upstreams_own
