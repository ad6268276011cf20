"""Hedging (`hedge_after`) in-process: the gate with a scripted upstream client whose answers take their time."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmha.core.candidates import CandidatePicker
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, ProfileError, RetryBudgetSettings, Upstream, parse_profile
from llmha.core.retry import RetryDiscipline
from llmha.core.types import NodeId, Outcome
from llmha.proxy.gate import Gate, GateResult, LlmRequest
from llmha.proxy.upstream import Headers

PRIMARY, PRIMARY_2, FALLBACK = "http://primary:1", "http://primary:2", "http://fallback:3"
SSE = [("content-type", "text/event-stream")]
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
DONE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}' \
       b'\n\ndata: [DONE]\n\n'


def profile(hedge_after: float | None = 0.05, primary_timeout: float = 0.5, primaries=(PRIMARY,),
            fallback_limit: int | None = None) -> Profile:
    return Profile(path="h.yaml", upstreams=(
        Upstream("primary", tuple(primaries), first_byte_timeout=primary_timeout, hedge_after=hedge_after),
        Upstream("fallback", (FALLBACK,), first_byte_timeout=1.0, max_inflight=fallback_limit),
    ))


class Slow:
    """A streamed answer whose headers and first token come after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.status_code, self.reason_phrase = delay, 200, "OK"
        self.headers, self.is_closed = Headers(list(SSE)), False

    async def aiter_bytes(self):
        yield CHUNK
        yield DONE

    async def aread(self) -> bytes:
        return CHUNK + DONE

    def finish(self) -> None:
        self.is_closed = True

    async def aclose(self) -> None:
        self.finish()


class Client:
    """Each URL answers from its script in order, after the script's delay; records what was asked and cancelled."""

    def __init__(self, **scripts: list[Slow]) -> None:
        self.scripts = {url: list(s) for url, s in scripts.items()}
        self.sent: list[str] = []
        self.cancelled: list[str] = []

    async def send(self, method, url, headers, body):
        base = url.split("/v1")[0]
        self.sent.append(base)
        script = self.scripts[base].pop(0)
        try:
            await asyncio.sleep(script.delay)
        except asyncio.CancelledError:
            self.cancelled.append(base)
            raise
        return script


def run(client: Client, prof: Profile, pool: NodePool | None = None, stream: bool = True, retry=None):
    pool = pool or NodePool(prof, 0.0)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}).encode()
    request = LlmRequest.parse_body("POST", "/v1/chat/completions", [], body)

    async def go():
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await Gate(pool, client, retry=retry).run(request, CandidatePicker(prof).candidates(pool, 0.0))
        return result, loop.time() - started

    result, took = asyncio.run(go())
    return result, pool, took


def outcomes(result) -> list[tuple[str, str, bool]]:
    return [(a.upstream, a.outcome, a.hedge) for a in result.attempts]


def test_a_late_first_token_is_hedged_on_the_next_candidate_and_the_loser_is_not_counted_against_its_node():
    prof = profile(hedge_after=0.05)
    client = Client(**{PRIMARY: [Slow(0.3)], FALLBACK: [Slow(0.0)]})
    result, pool, took = run(client, prof)
    assert result.winner.upstream.name == "fallback" and result.stream is not None
    assert took < 0.2, "the fallback's answer, not the primary's 300 ms"
    assert outcomes(result) == [("primary", "cancelled", False), ("fallback", "ok", True)]
    assert client.cancelled == [PRIMARY], "the primary's attempt closed at once"
    primary, fallback = pool[NodeId("primary", PRIMARY)], pool[NodeId("fallback", FALLBACK)]
    assert (primary.inflight, primary.monitor.failures) == (0, 0), "lost a race: not the node's failure"
    assert fallback.inflight == 1, "the winner's stream holds its lease"
    result.stream.finish(Outcome.OK)
    assert fallback.inflight == 0 and fallback.monitor.failures == 0


def test_an_answer_before_hedge_after_starts_no_hedge():
    client = Client(**{PRIMARY: [Slow(0.0)], FALLBACK: []})
    result, _, _ = run(client, profile(hedge_after=0.2))
    assert outcomes(result) == [("primary", "ok", False)] and client.sent == [PRIMARY]
    result.stream.finish(Outcome.OK)


def test_the_first_attempt_still_wins_if_it_answers_first_and_the_hedge_is_closed():
    client = Client(**{PRIMARY: [Slow(0.1)], FALLBACK: [Slow(0.4)]})
    result, pool, took = run(client, profile(hedge_after=0.05))
    assert result.winner.upstream.name == "primary" and took < 0.3
    assert outcomes(result) == [("primary", "ok", False), ("fallback", "cancelled", True)]
    assert client.cancelled == [FALLBACK]
    fallback = pool[NodeId("fallback", FALLBACK)]
    assert (fallback.inflight, fallback.monitor.failures) == (0, 0)
    result.stream.finish(Outcome.OK)


def test_an_attempt_whose_own_first_byte_timeout_passes_during_the_race_is_a_timeout_as_usual():
    client = Client(**{PRIMARY: [Slow(5.0)], FALLBACK: [Slow(0.2)]})
    result, pool, _ = run(client, profile(hedge_after=0.05, primary_timeout=0.1))
    assert outcomes(result) == [("primary", "timeout", False), ("fallback", "ok", True)]
    assert pool[NodeId("primary", PRIMARY)].monitor.failures == 1
    assert pool[NodeId("fallback", FALLBACK)].monitor.failures == 0
    result.stream.finish(Outcome.OK)


def test_no_hedge_on_a_candidate_without_room():
    prof = profile(hedge_after=0.05, fallback_limit=1)
    pool = NodePool(prof, 0.0)
    held = pool.try_acquire(NodeId("fallback", FALLBACK), 0.0, streamed=True)
    client = Client(**{PRIMARY: [Slow(0.15)], FALLBACK: []})
    result, _, _ = run(client, prof, pool=pool)
    assert outcomes(result) == [("primary", "ok", False)], "waited for the primary rather than pass the limit"
    assert pool[NodeId("fallback", FALLBACK)].shed == 1
    held.release(Outcome.OK, 1.0)
    result.stream.finish(Outcome.OK)


def test_a_hedge_on_the_same_upstream_is_a_retry_and_needs_its_budget():
    prof = profile(hedge_after=0.05, primaries=(PRIMARY, PRIMARY_2))
    no_retries = Profile(path="h.yaml", upstreams=prof.upstreams,
                         retry_budget=RetryBudgetSettings(percent=0, min_per_s=0))
    retry = RetryDiscipline(no_retries)
    client = Client(**{PRIMARY: [Slow(0.3)], PRIMARY_2: [Slow(0.3)], FALLBACK: [Slow(0.0)]})
    result, pool, _ = run(client, prof, retry=retry)
    assert result.winner.upstream.name == "fallback"
    assert [a.upstream for a in result.attempts] == ["primary", "fallback"], "the second primary node not asked"
    assert retry.budget("primary").denied == 1
    result.stream.finish(Outcome.OK)


def test_with_budget_the_hedge_goes_to_the_next_node_and_the_first_to_answer_wins():
    prof = profile(hedge_after=0.05, primaries=(PRIMARY, PRIMARY_2))
    client = Client(**{PRIMARY: [Slow(0.3)], PRIMARY_2: [Slow(0.3)], FALLBACK: [Slow(0.0)]})
    result, pool, took = run(client, prof)
    # primary 1 at 0, primary 2 at 50 ms, the fallback at 100 ms answers first
    assert [(a.upstream, a.outcome, a.hedge) for a in result.attempts] == [
        ("primary", "cancelled", False), ("primary", "cancelled", True), ("fallback", "ok", True)]
    assert took < 0.25 and sorted(client.cancelled) == [PRIMARY, PRIMARY_2]
    assert all(pool[NodeId("primary", url)].inflight == 0 for url in (PRIMARY, PRIMARY_2))
    result.stream.finish(Outcome.OK)


def test_a_non_streaming_chat_request_is_hedged_too_and_gets_its_assembled_answer():
    client = Client(**{PRIMARY: [Slow(0.3)], FALLBACK: [Slow(0.0)]})
    result, pool, took = run(client, profile(hedge_after=0.05), stream=False)
    assert result.answer.status == 200 and json.loads(result.answer.body)["object"] == "chat.completion"
    assert result.winner.upstream.name == "fallback" and took < 0.2
    assert pool[NodeId("primary", PRIMARY)].inflight == 0 and pool[NodeId("fallback", FALLBACK)].inflight == 0


def test_without_hedge_after_the_gate_waits_for_the_late_first_token():
    client = Client(**{PRIMARY: [Slow(0.1)], FALLBACK: []})
    result, _, took = run(client, profile(hedge_after=None))
    assert outcomes(result) == [("primary", "ok", False)] and took >= 0.1
    result.stream.finish(Outcome.OK)


def test_a_client_that_leaves_mid_race_gets_every_attempt_closed_and_no_node_blamed():
    prof = profile(hedge_after=0.02)
    pool = NodePool(prof, 0.0)
    client = Client(**{PRIMARY: [Slow(5.0)], FALLBACK: [Slow(5.0)]})
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    request = LlmRequest.parse_body("POST", "/v1/chat/completions", [], body)
    result = GateResult()

    async def main():
        task = asyncio.ensure_future(Gate(pool, client).run(request, CandidatePicker(prof).candidates(pool, 0.0),
                                                            result))
        await asyncio.sleep(0.1)  # both attempts under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert outcomes(result) == [("primary", "cancelled", False), ("fallback", "cancelled", True)]
    assert sorted(client.cancelled) == [FALLBACK, PRIMARY]
    for node in pool.nodes:
        assert (pool[node].inflight, pool[node].monitor.failures) == (0, 0)


def _parse(text_top: str = "", text_primary: str = "") -> Profile:
    import yaml

    data = yaml.safe_load(f"""
first_byte_timeout: 200ms
{text_top}
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:1"]
{text_primary}
  - name: fallback
    nodes: ["http://127.0.0.1:2"]
    first_byte_timeout: 5s
""")
    return parse_profile(data, "p.yaml", {}, None)


def test_profile_hedge_after_top_level_and_per_upstream():
    assert [u.hedge_after for u in _parse().upstreams] == [None, None]
    assert [u.hedge_after for u in _parse("hedge_after: 150ms").upstreams] == [0.15, 0.15]
    assert [u.hedge_after for u in _parse(text_primary="    hedge_after: 100ms").upstreams] == [0.1, None]


@pytest.mark.parametrize("top, primary, message", [
    ("hedge_after: 200ms", "", "p.yaml: hedge_after: 0.2s is not shorter than upstreams[0]'s first_byte_timeout"),
    ("", "    hedge_after: 1s", "p.yaml: upstreams[0].hedge_after: 1s is not shorter than"),
    ("", "    hedge_after: soon", "p.yaml: upstreams[0].hedge_after: bad duration 'soon'"),
])
def test_profile_refuses_a_hedge_after_that_could_never_fire(top, primary, message):
    with pytest.raises(ProfileError) as caught:
        _parse(top, primary)
    assert str(caught.value).startswith(message)
