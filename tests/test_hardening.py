"""Issue 17's rules, unit by unit: what a fallback is sent, how a 2xx is judged, 429s, `stream` values,
attempts held past their limit, and which flows the default `match` takes."""

from __future__ import annotations

import email.utils
import json

import httpx
import pytest
from mitmproxy.proxy import mode_specs
from mitmproxy.test import tflow

from llmha.addons.runtime import Runtime
from llmha.core.candidates import Candidate
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.status import is_loopback
from llmha.core.types import AttemptRecord, NodeId, Outcome
from llmha.proxy.gate import (
    CompleteAnswer,
    LlmRequest,
    _AttemptFailed,
    assembles,
    failure_answer,
    judge_answer,
    retry_after_s,
    stream_flag,
    streamed_form,
    upstream_headers,
    with_stream_decided,
)

PRIMARY = Upstream("primary", ("http://10.0.0.5:8000",))
KEYED_PRIMARY = Upstream("primary", ("http://10.0.0.5:8000",), api_key="sk-primary")
FALLBACK = Upstream("fallback", ("https://api.example.com",), api_key="sk-fallback")
KEYLESS_FALLBACK = Upstream("backup", ("https://backup.example.com",))
CLIENT = [("authorization", "Bearer sk-client"), ("cookie", "s=1"), ("openai-organization", "org-1"),
          ("openai-project", "proj-1"), ("x-goog-api-key", "g"), ("x-api-key", "x"), ("api-key", "a"),
          ("x-tenant", "t-1"), ("content-type", "application/json"), ("user-agent", "ua"),
          ("x-stainless-lang", "python"), ("host", "proxy:8080"), ("connection", "keep-alive"),
          ("accept-encoding", "gzip")]
CREDENTIALS = {"authorization", "cookie", "openai-organization", "openai-project", "x-goog-api-key", "x-api-key",
               "api-key"}


def sent(upstream: Upstream, is_primary: bool) -> dict[str, str]:
    headers = upstream_headers(CLIENT, Candidate(upstream, NodeId(upstream.name, upstream.nodes[0]), is_primary))
    return dict(headers)


def test_the_primary_without_a_key_gets_the_clients_headers_as_the_server_it_addresses():
    headers = sent(PRIMARY, True)
    assert headers["authorization"] == "Bearer sk-client" and headers["x-tenant"] == "t-1"
    assert headers["accept-encoding"] == "identity" and "host" not in headers and "connection" not in headers


def test_a_primary_with_its_own_key_gets_none_of_the_clients_credentials():
    headers = sent(KEYED_PRIMARY, True)
    assert headers["authorization"] == "Bearer sk-primary"
    assert not (CREDENTIALS - {"authorization"}) & set(headers)


@pytest.mark.parametrize("fallback", [FALLBACK, KEYLESS_FALLBACK], ids=["with-key", "without-key"])
def test_a_fallback_gets_only_what_describes_the_request(fallback):
    headers = sent(fallback, False)
    assert headers.pop("authorization", None) == (f"Bearer {fallback.api_key}" if fallback.api_key else None)
    assert set(headers) == {"content-type", "user-agent", "x-stainless-lang", "accept-encoding"}


def test_every_attempt_rate_limited_is_a_429_with_the_shortest_retry_after():
    attempts = [AttemptRecord("primary", "n1", 0, outcome="rate_limited", status=429),
                AttemptRecord("fallback", "n2", 0, outcome="rate_limited", status=429)]
    answer = failure_answer(attempts, retry_after=2.2)
    assert answer.status == 429 and dict(answer.headers)["retry-after"] == "3"
    assert dict(answer.headers)["retry-after-ms"] == "2200"
    assert json.loads(answer.body)["error"]["code"] == "rate_limited"
    assert "retry-after" not in dict(failure_answer(attempts).headers)
    mixed = [attempts[0], AttemptRecord("fallback", "n2", 0, outcome="http_error", status=500)]
    assert failure_answer(mixed, retry_after=2.2).status == 502


def test_retry_after_in_milliseconds_seconds_or_an_http_date():
    now = 1_700_000_000.0
    assert retry_after_s(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"}), now) == 1.5
    assert retry_after_s(httpx.Headers({"retry-after": "12"}), now) == 12
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_s(httpx.Headers({"retry-after": date}), now) == pytest.approx(30)
    assert retry_after_s(httpx.Headers({"retry-after": "soon"}), now) is None
    assert retry_after_s(httpx.Headers({}), now) is None


@pytest.mark.parametrize(("value", "flag"), [(True, True), ("yes", True), ("true", True), ("1", True), (1, True),
                                             ("no", False), ("off", False), (0, False), (False, False),
                                             ("maybe", None), ({}, None), (None, None), (2, None)])
def test_stream_values_read_as_a_lax_server_reads_them(value, flag):
    assert stream_flag(value) is flag


def request(payload: dict, path: str = "/v1/chat/completions") -> LlmRequest:
    return LlmRequest.parse_body("POST", path, [], json.dumps(payload).encode())


def test_a_stream_value_is_sent_as_the_boolean_the_gate_gates():
    decided = with_stream_decided(request({"stream": "yes", "messages": []}))
    assert decided.stream and json.loads(decided.body)["stream"] is True
    unknown = request({"stream": "maybe", "messages": []})
    assert with_stream_decided(unknown) is unknown


def test_non_streaming_chat_completions_are_asked_as_streams_with_usage():
    plain = request({"model": "m", "messages": [], "stream_options": {"x": 1}})
    assert assembles(plain) and not assembles(request({"messages": [], "stream": True}))
    assert not assembles(request({"input": "x"}, path="/v1/embeddings"))
    body = json.loads(streamed_form(plain).body)
    assert body["stream"] is True and body["stream_options"] == {"x": 1, "include_usage": True}


@pytest.mark.parametrize(("status", "content_type", "body", "outcome"), [
    (200, "application/json", b'{"error": {"message": "overloaded"}}', Outcome.IN_BAND_ERROR),
    (200, "application/json", b'{"id": "x", "choices": [', Outcome.TRUNCATED),
    (200, "application/json", b"", Outcome.TRUNCATED),
    (200, "", b'{"error": "busy"}', Outcome.IN_BAND_ERROR),
    (200, "application/json", b'{"id": "x", "error": null, "choices": []}', None),
    (200, "audio/mpeg", b"\xff\xfb", None),
    (400, "application/json", b'{"error": {"message": "bad"}}', None),
])
def test_a_2xx_json_answer_is_judged_by_its_body(status, content_type, body, outcome):
    answer = CompleteAnswer(status, [("content-type", content_type)] if content_type else [], body)
    if outcome is None:
        assert judge_answer(answer) is answer
    else:
        with pytest.raises(_AttemptFailed) as failed:
            judge_answer(answer)
        assert failed.value.outcome is outcome


def test_an_attempt_held_far_past_its_limit_counts_as_a_timeout_in_its_interval():
    profile = Profile(path="o.yaml", upstreams=(Upstream("primary", ("http://127.0.0.1:1",), first_byte_timeout=0.2),))
    pool = NodePool(profile, 0.0)
    node = NodeId("primary", "http://127.0.0.1:1")
    stuck = pool.try_acquire(node, 0.0, streamed=True)
    pool.advance(1.0)
    assert pool[node].monitor.failures == 0  # 2 x 0.2 s + one interval (1 s) not yet past
    pool.advance(1.5)
    assert pool[node].monitor.failures == 1 and pool[node].inflight == 1
    pool.advance(2.01)
    assert pool[node].monitor.is_ejected(2.01)
    stuck.release(Outcome.TIMEOUT, 30.0)
    assert pool[node].monitor.failures == 1 and pool[node].inflight == 0  # counted once


def test_an_attempt_judged_in_time_is_not_counted_again_as_overdue():
    profile = Profile(path="o.yaml", upstreams=(Upstream("primary", ("http://127.0.0.1:1",), first_byte_timeout=0.2),))
    pool = NodePool(profile, 0.0)
    node = NodeId("primary", "http://127.0.0.1:1")
    streaming = pool.try_acquire(node, 0.0, streamed=True)
    streaming.first_byte(0.1, 0.1)  # a long stream after its first token is not overdue
    pool.advance(100.0)
    assert pool[node].monitor.failures == 0 and pool[node].monitor.requests == 1


def runtime_for(match: str | None) -> Runtime:
    extra = {} if match is None else {"match": match, "match_given": True}
    profile = Profile(path="m.yaml", upstreams=(PRIMARY, FALLBACK), **extra)
    return Runtime(profile, events=None)


def flow_to(host: str, port: int, mode: str = "regular", sockname=("127.0.0.1", 8080)):
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.path = host, port, "/v1/chat/completions"
    flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
    flow.client_conn.sockname = sockname
    return flow


def test_the_default_match_takes_only_flows_to_the_primary_outside_reverse_mode():
    runtime = runtime_for(None)
    assert runtime.selects(flow_to("10.0.0.5", 8000))
    assert not runtime.selects(flow_to("api.openai.com", 443))
    assert not runtime.selects(flow_to("10.0.0.5", 9000))
    assert runtime.selects(flow_to("127.0.0.1", 8080))  # the proxy itself, as the client's base_url
    assert runtime.selects(flow_to("api.openai.com", 443, mode="reverse:http://10.0.0.5:8000"))
    assert runtime_for("~u /v1/").selects(flow_to("api.openai.com", 443))  # written in the profile: as it says


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
