"""Replaying recorded traffic: the what-if evaluation (pure, CLI, addon) and replay through real mitmdumps."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from mitmproxy import flowfilter, io
from mitmproxy.http import Headers
from mitmproxy.test import tflow, tutils

from llmbench.proxy import ADDON, REPO, mitmdump_command
from llmha.core.profile import HealthCheck, Upstream, load_profile
from llmha.core.types import Outcome
from llmha.replay import (
    PNG_NEEDS_MATPLOTLIB,
    RecordedAttempt,
    ReplayError,
    attempts_from_flow,
    evaluate,
    judge,
    read_attempts,
    render_table,
    write_timeline_png,
)
from llmsim.control import free_port

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = DATA / "sample-recording.flows"
REPLAY_SCRIPT = ADDON  # addons/llm_ha.py: llm-ha and its replay evaluator
RUN_TIMEOUT = 40


# -- helpers

def write_profile(path: Path, primary: str, fallback: str, *, first_byte="300ms", threshold=50, min_requests=1,
                  interval="500ms", base="2s") -> Path:
    path.write_text(f"""
first_byte_timeout: {first_byte}
request_timeout: 10s
health_check:
  failure_rate_threshold: {threshold}
  interval: {interval}
  base_ejection_time: {base}
  max_ejection_time: 8s
  min_requests: {min_requests}
upstreams:
  - name: primary
    nodes: ["{primary}"]
  - name: fallback
    nodes: ["{fallback}"]
    first_byte_timeout: 2s
""")
    return path


def read_flows(path) -> list:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def mitmdump(*args: str, confdir: str | None = None, port: int | None = None) -> list[str]:
    """A mitmdump command; with `port`, listening on 127.0.0.1 there (else give -n)."""
    command = [*mitmdump_command(), "--set", "termlog_verbosity=info", "--set", "flow_detail=0"]
    if port:
        command += ["-p", str(port), "--set", "listen_host=127.0.0.1"]
    if confdir:
        command += ["--set", f"confdir={confdir}"]
    return command + list(args)


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    """Run a mitmdump that ends by itself (-r, client replay); killed after RUN_TIMEOUT s."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def background():
    """`background(command, port)` starts a long-running process and waits for its port; all stopped after."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], port: int) -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, cwd=REPO)
        started.append(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{' '.join(command)} exited with {process.returncode}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
            time.sleep(0.1)
        raise AssertionError(f"{' '.join(command)} did not listen on {port} in 30 s")

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class CountingListener:
    """A socket on 127.0.0.1 that accepts and counts connections: proof that nothing connected."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener():
    counting = CountingListener()
    yield counting
    counting.close()


def attempt(start, outcome="ok", ttfb=0.05, upstream="primary", node="http://p:1", request=None, index=0,
            duration=None, streamed=True) -> RecordedAttempt:
    return RecordedAttempt(request_id=request or f"r{start}", index=index, upstream=upstream, node=node,
                           start=start, outcome=outcome, ttfb_s=ttfb, duration_s=duration, streamed=streamed)


# -- judging one attempt

FAST = Upstream("primary", ("http://p:1",), first_byte_timeout=0.2, request_timeout=5.0)


def test_a_late_first_byte_becomes_a_timeout_decided_at_the_limit():
    v = judge(attempt(100.0, ttfb=0.35, duration=1.0), FAST)
    assert (v.outcome, v.decided_at, v.became_timeout) == (Outcome.TIMEOUT, 100.2, True)


def test_a_first_byte_in_time_is_decided_at_the_first_byte():
    v = judge(attempt(100.0, ttfb=0.15, duration=1.0), FAST)
    assert (v.outcome, v.decided_at, v.became_timeout) == (Outcome.OK, 100.15, False)


def test_a_recorded_timeout_stays_one_under_a_looser_limit():
    loose = Upstream("primary", ("http://p:1",), first_byte_timeout=2.0)
    v = judge(attempt(100.0, outcome="timeout", ttfb=None, duration=0.3), loose)
    assert (v.outcome, v.decided_at, v.became_timeout) == (Outcome.TIMEOUT, 102.0, False)


def test_non_streamed_requests_are_held_to_the_request_timeout_over_the_whole_answer():
    v = judge(attempt(100.0, ttfb=0.9, duration=3.0, streamed=False), FAST)
    assert (v.outcome, v.decided_at) == (Outcome.OK, 103.0)
    assert judge(attempt(100.0, ttfb=0.9, duration=6.0, streamed=False), FAST).outcome is Outcome.TIMEOUT


def test_a_failure_is_decided_when_it_ended_and_a_cut_stream_counts_twice():
    assert judge(attempt(100.0, outcome="http_error", ttfb=None, duration=0.05), FAST).decided_at == 100.05
    cut = judge(attempt(100.0, outcome="stream_cut", ttfb=0.1, duration=2.0), FAST)
    assert (cut.outcome, cut.decided_at, cut.cut_at) == (Outcome.OK, 100.1, 102.0)


# -- the evaluation on hand-made attempts

def hand_profile(tmp_path, **kwargs):
    return load_profile(write_profile(tmp_path / "p.yaml", "http://p:1", "http://f:2", **kwargs))


def test_evaluate_ejects_on_recorded_times_and_moves_requests_that_arrive_meanwhile(tmp_path):
    profile = hand_profile(tmp_path, first_byte="200ms", interval="1s", base="2s")
    attempts = [
        attempt(1000.0, ttfb=0.05),
        attempt(1000.5, ttfb=0.30),  # late: a timeout at 1000.7
        attempt(1000.6, ttfb=0.25),  # late: a timeout at 1000.8 -> 2 of 3 failed in [1000, 1001)
        attempt(1000.6, ttfb=0.05, upstream="fallback", node="http://f:2", request="r1000.6", index=1),
        attempt(1001.5, ttfb=0.05),  # the primary is ejected [1001, 1003): moved
        attempt(1003.2, ttfb=0.05),  # back in rotation
    ]
    report = evaluate(attempts, profile)

    primary = report.node("primary")
    assert [(e.start, e.end, e.k, round(e.failure_rate, 2)) for e in primary.ejections] == [(1001.0, 1003.0, 1, 66.67)]
    assert [(j.attempt.start, j.moved_to) for j in report.moved] == [(1001.5, "fallback http://f:2")]
    assert (primary.attempts, primary.fed, primary.moved, primary.became_timeouts) == (5, 4, 1, 2)
    assert primary.failures == {"timeout": 2} and primary.outcomes["ok"] == 2
    assert [(i.start, i.requests, i.failures) for i in primary.intervals] == [(1000.0, 3, 2), (1003.0, 1, 0)]
    assert report.node("fallback").ejections == [] and report.requests == 5
    document = json.loads(report.to_json())
    ejection = document["nodes"][0]["ejections"][0]
    assert (ejection["start_s"], ejection["end_s"], ejection["k"], ejection["duration_s"]) == (1.0, 3.0, 1, 2.0)
    assert document["moved"] == [{"request": "r1001.5", "ts": 1001.5, "t_s": 1.5, "upstream": "primary",
                                  "node": "http://p:1", "moved_to": "fallback http://f:2"}]
    assert "primary" in render_table(report) and "1.00" in render_table(report)


def test_k_grows_with_each_ejection_and_the_next_lasts_longer(tmp_path):
    profile = hand_profile(tmp_path, first_byte="200ms", interval="1s", base="2s")
    failing = [attempt(1000.0 + t, ttfb=0.5) for t in (0.0, 3.0, 8.0, 20.0)]
    report = evaluate(failing, profile)
    # fails in [1000,1001): out [1001,1003) k=1; fails in [1003,1004): out [1004,1008) k=2; back at
    # 1008, fails in [1008,1009), before 2 s of health would lower k: k=3 for 6 s, out [1009,1015).
    # Back at 1015 with k=4 next, healthy: k falls to 3 at 1017, 2 at 1019, 1 at 1021; that decrease and
    # the judgement of [1020,1021) fall on the same boundary, the decrease first: ejected with k=1.
    assert [(e.start, e.end, e.k) for e in report.node("primary").ejections] == [
        (1001.0, 1003.0, 1), (1004.0, 1008.0, 2), (1009.0, 1015.0, 3), (1021.0, 1023.0, 1)]


def test_a_request_moves_to_another_node_of_the_same_upstream_first(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text('first_byte_timeout: 200ms\nhealth_check: {interval: 1s, base_ejection_time: 2s}\n'
                    'upstreams: [{name: primary, nodes: ["http://p:1", "http://p:3"]},'
                    ' {name: fallback, nodes: ["http://f:2"]}]\n')
    report = evaluate([attempt(1000.0, ttfb=0.5), attempt(1001.5, ttfb=0.05)], load_profile(path))
    assert [j.moved_to for j in report.moved] == ["primary http://p:3"]


def test_recorded_nodes_stand_in_for_profile_nodes_the_recording_never_saw(tmp_path):
    profile = hand_profile(tmp_path, first_byte="200ms", interval="1s")
    report = evaluate([attempt(1000.0, ttfb=0.5, node="http://old:7"), attempt(1001.5, ttfb=0.05, node="http://old:7")],
                      profile)
    assert [n.node.url for n in report.nodes] == ["http://old:7", "http://f:2"]
    assert [j.moved_to for j in report.moved] == ["fallback http://f:2"]
    assert "primary: the recorded nodes http://old:7 stand in for the profile's http://p:1" in report.notes
    empty = evaluate([], profile)
    assert empty.requests == 0 and empty.notes == ["the recording holds no LLM attempt"]


def test_when_every_node_is_ejected_requests_still_try_them(tmp_path):
    path = tmp_path / "single.yaml"
    path.write_text('first_byte_timeout: 200ms\nhealth_check: {interval: 1s, base_ejection_time: 2s}\n'
                    'upstreams: [{name: primary, nodes: ["http://p:1"]}]\n')
    report = evaluate([attempt(1000.0, ttfb=0.5), attempt(1001.5, ttfb=0.05)], load_profile(path))
    assert report.moved == [] and report.node("primary").fed == 2


# -- the sample recording, against a reference computed independently from its attempts

def reference_timeline(attempts: list[RecordedAttempt], hc: HealthCheck, limit: float, request_timeout: float):
    """Interval by interval, for a lone primary node whose fallback never fails.

    Valid when the interval and the ejection times are binary fractions (0.5 s, 2 s): every ejection,
    return and k decrease then falls on an interval boundary, so a node is in or out for whole intervals.
    """
    t0 = min(a.start for a in attempts)
    primary = sorted((a for a in attempts if a.upstream == "primary"), key=lambda a: a.start)
    assert {a.outcome for a in primary} <= {"ok", "timeout"}
    assert {a.outcome for a in attempts if a.upstream == "fallback"} == {"ok"}

    def decision(a: RecordedAttempt) -> tuple[float, bool]:
        limit_here, elapsed = (limit, a.ttfb_s) if a.streamed else (request_timeout, a.duration_s)
        if a.outcome == "timeout" or elapsed > limit_here:
            return a.start + limit_here, True
        return a.start + elapsed, False

    buckets: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    ejections, moved = [], []
    until, next_k, healthy_since = None, 1, t0
    last = max(decision(a)[0] for a in primary)
    i = 0
    while t0 + i * hc.interval <= last + hc.interval:
        begin, end = t0 + i * hc.interval, t0 + (i + 1) * hc.interval
        for a in (a for a in primary if begin <= a.start < end):
            if until is not None:
                moved.append(a.request_id)
                continue
            at, failed = decision(a)
            bucket = buckets[math.floor((at - t0) / hc.interval)]
            bucket[0] += 1
            bucket[1] += failed
        if until is not None and until <= end:
            healthy_since, until = until, None
        while until is None and next_k > 1 and healthy_since + hc.base_ejection_time <= end:
            next_k, healthy_since = next_k - 1, healthy_since + hc.base_ejection_time
        total, failed = buckets.pop(i, [0, 0])
        if until is None and total >= hc.min_requests and 100 * failed / total >= hc.failure_rate_threshold:
            duration = min(next_k * hc.base_ejection_time, hc.max_ejection_time)
            until = end + duration
            ejections.append((end, until, next_k))
            if next_k * hc.base_ejection_time < hc.max_ejection_time:
                next_k += 1
        i += 1
    return ejections, moved


WHAT_IFS = {
    "as-recorded-300ms": dict(first_byte="300ms"),
    "strict-150ms": dict(first_byte="150ms"),
    "threshold-100-min-3": dict(first_byte="300ms", threshold=100, min_requests=3),
}


@pytest.fixture(scope="module")
def sample_attempts() -> list[RecordedAttempt]:
    return read_attempts(SAMPLE)


def test_the_sample_recording_is_small_and_holds_an_ejection_story():
    assert SAMPLE.stat().st_size < 300 * 1024
    flows = read_flows(SAMPLE)
    summaries = [f.comment for f in flows]
    assert any(s.startswith("primary ok") for s in summaries)
    assert any(s.startswith("primary timeout") and "-> fallback ok" in s for s in summaries)
    assert any(s.startswith("fallback ok") for s in summaries), "the live proxy ejected the primary"
    assert any(s.startswith("primary ok") for s in summaries[-10:]), "the primary came back"


def test_what_ifs_on_the_sample_match_an_independent_computation(tmp_path, sample_attempts):
    timelines = {}
    for name, settings in WHAT_IFS.items():
        profile = load_profile(write_profile(tmp_path / f"{name}.yaml", "http://127.0.0.1:9", "http://127.0.0.1:9",
                                             **settings))
        report = evaluate(sample_attempts, profile)
        primary = report.node("primary")
        upstream = profile.upstreams[0]
        expected, expected_moved = reference_timeline(sample_attempts, profile.health_check,
                                                      upstream.first_byte_timeout, upstream.request_timeout)
        assert [(e.start, e.end, e.k) for e in primary.ejections] == expected, name
        assert [j.attempt.request_id for j in report.moved] == expected_moved, name
        assert report.node("fallback").ejections == []
        timelines[name] = [(round(s - report.start, 3), k) for s, _, k in expected]
    strict, recorded = timelines["strict-150ms"], timelines["as-recorded-300ms"]
    assert recorded and strict and strict != recorded
    assert strict[0][0] < recorded[0][0], "a stricter first-byte timeout ejects during the 0.2 s delay phase"
    assert max(k for _, k in recorded) >= 2, "the primary failed again after its first return"
    assert timelines["threshold-100-min-3"] != recorded


def test_report_outputs_and_a_clear_message_without_matplotlib(tmp_path, sample_attempts, monkeypatch):
    profile = load_profile(write_profile(tmp_path / "p.yaml", "http://127.0.0.1:9", "http://127.0.0.1:9"))
    report = evaluate(sample_attempts, profile)
    png = tmp_path / "timeline.png"
    write_timeline_png(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(report.to_json())
    assert document["totals"]["requests"] == len(read_flows(SAMPLE))
    assert {n["upstream"] for n in document["nodes"]} == {"primary", "fallback"}
    assert all("failure_rate" in i for n in document["nodes"] for i in n["intervals"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReplayError, match="needs matplotlib"):
        write_timeline_png(report, tmp_path / "no.png")
    assert "pip install matplotlib" in PNG_NEEDS_MATPLOTLIB


def test_the_command_writes_the_report_and_the_png(tmp_path, sample_attempts):
    profile_path = write_profile(tmp_path / "p.yaml", "http://127.0.0.1:9", "http://127.0.0.1:9", first_byte="150ms")
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "llmha.replay", str(SAMPLE), "--profile", str(profile_path),
                             "--report", str(out), "--png", str(png)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "ejection periods" in result.stdout and png.stat().st_size > 1000
    expected = evaluate(sample_attempts, load_profile(profile_path)).to_dict()
    assert json.loads(out.read_text())["nodes"] == expected["nodes"]


def test_the_command_refuses_a_bad_profile_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{name: primary}]\n")
    result = subprocess.run([sys.executable, "-m", "llmha.replay", str(SAMPLE), "--profile", str(bad)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--reverse-target" in result.stderr


# -- failed-over flows

def test_the_comment_filter_lists_exactly_the_failed_over_flows():
    flows = read_flows(SAMPLE)
    failed_over = flowfilter.parse('~comment " -> "')
    listed = [f.id for f in flows if failed_over(f)]
    assert listed and listed == [f.id for f in flows if len(f.metadata["llm_ha"]["attempts"]) > 1]


# -- recordings made without llm-ha

def plain_flow(status=200, content=b"", content_type="text/event-stream", response=True, error=None,
               stream_request=True) -> object:
    body = json.dumps({"model": "m", "stream": stream_request, "messages": []}).encode()
    flow = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=body))
    flow.request.timestamp_start = 1000.0
    if response:
        flow.response = tutils.tresp(status_code=status, content=content,
                                     headers=Headers(((b"content-type", content_type.encode()),)))
        flow.response.timestamp_start, flow.response.timestamp_end = 1000.25, 1001.0
    if error:
        flow.error = tflow.terr(error)
        flow.error.timestamp = 1000.5
    return flow


@pytest.mark.parametrize("flow_kwargs, outcome", [
    (dict(content=b'data: {"choices": []}\n\n'), "ok"),
    (dict(status=429), "rate_limited"),
    (dict(status=503), "http_error"),
    (dict(status=400), "client_error"),
    (dict(content=b'data: {"error": {"message": "overloaded"}}\n\n'), "in_band_error"),
    (dict(content=b'data: {"choices": []}\n\n', error="connection reset"), "stream_cut"),
    (dict(response=False, error="Connection refused"), "connect_error"),
    (dict(response=False, error="peer closed connection"), "reset"),
])
def test_plain_flows_get_the_outcome_llm_ha_would_give(flow_kwargs, outcome):
    (found,) = attempts_from_flow(plain_flow(**flow_kwargs))
    assert found.outcome == outcome
    assert found.upstream is None and found.node == "http://address:22"


def test_a_plain_streamed_flow_has_its_ttfb_approximated_by_the_response_headers(tmp_path):
    (found,) = attempts_from_flow(plain_flow(content=b'data: {"choices": []}\n\n'))
    assert (found.ttfb_s, found.duration_s, found.ttfb_approximated, found.streamed) == (0.25, 1.0, True, True)
    (whole,) = attempts_from_flow(plain_flow(content=b"{}", content_type="application/json", stream_request=False))
    assert not whole.ttfb_approximated and not whole.streamed
    report = evaluate([found], hand_profile(tmp_path))
    assert any("approximated by the time to the response headers" in note for note in report.notes)


@pytest.mark.e2e
def test_a_real_plain_recording_is_evaluated(tmp_path, simulators, background, confdir):
    sim = simulators("--no-physics")
    port = free_port()
    recording = tmp_path / "plain.flows"
    background(mitmdump("--mode", f"reverse:{sim.url}", "-w", str(recording), "--set", "connection_strategy=lazy",
                        confdir=confdir, port=port), port)
    body = {"model": "m", "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for faults in ({}, {"first_token_delay": 0.3}, {"first_token_delay": 0.0, "status": 500},
                       {"status": None, "in_band_error": True}, {"in_band_error": False, "refuse": True}):
            sim.set_faults(**faults)
            client.post("/v1/chat/completions", json=body)
            client.get("/health")  # not an LLM flow: the profile's match leaves it out
    profile = load_profile(write_profile(tmp_path / "p.yaml", sim.url, "http://127.0.0.1:9", first_byte="200ms",
                                         threshold=100, min_requests=10))  # never ejects: every attempt is judged
    deadline = time.monotonic() + 10
    while len(read_attempts(recording, profile.match)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    attempts = read_attempts(recording, profile.match)
    assert [a.outcome for a in attempts] == ["ok", "ok", "http_error", "in_band_error", "connect_error"]
    assert {a.node for a in attempts} == {sim.url}
    assert attempts[1].ttfb_s >= 0.3 and attempts[1].ttfb_approximated
    report = evaluate(attempts, profile)
    assert report.node(sim.url).outcomes == {"ok": 1, "timeout": 1, "http_error": 1, "in_band_error": 1,
                                             "connect_error": 1}
    assert report.node(sim.url).became_timeouts == 1


# -- the addon way: mitmdump -n -r FILE with llm-ha and the evaluator

@pytest.mark.e2e
def test_the_addon_evaluates_a_read_recording_and_llm_ha_sends_nothing(tmp_path, listener, sample_attempts):
    profile_path = write_profile(tmp_path / "p.yaml", listener.url, listener.url, first_byte="150ms")
    out = tmp_path / "report.json"
    result = run_to_end(mitmdump("-n", "-r", str(SAMPLE), "-s", str(REPLAY_SCRIPT),
                                 "--set", f"llm_ha_profile={profile_path}", "--set", f"llm_ha_replay_report={out}"))
    expected = evaluate(sample_attempts, load_profile(profile_path)).to_dict()
    document = json.loads(out.read_text())
    assert document["nodes"] == expected["nodes"] and document["moved"] == expected["moved"]
    assert document["nodes"][0]["ejections"], "the strict profile ejects the primary"
    assert out.with_suffix(".png").stat().st_size > 1000
    output = result.stdout + result.stderr
    assert "ejection periods" in output and f"llm-ha replay: {len(read_flows(SAMPLE))} flows" in output
    time.sleep(0.3)
    assert listener.accepted == 0, "read flows must never be sent upstream"


# -- replay through the proxy

SIMPLE_PROFILE = """
first_byte_timeout: 2s
request_timeout: 10s
upstreams:
  - name: primary{primary_nodes}
  - name: fallback
    nodes: ["{fallback}"]
"""


def simple_profile(tmp_path, fallback: str, primary: str | None = None) -> Path:
    nodes = f'\n    nodes: ["{primary}"]' if primary else ""
    path = tmp_path / "live.yaml"
    path.write_text(SIMPLE_PROFILE.format(primary_nodes=nodes, fallback=fallback))
    return path


@pytest.mark.e2e
def test_client_replay_sends_recorded_requests_to_the_current_upstreams(tmp_path, simulators, confdir):
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    out = tmp_path / "replayed.flows"
    run_to_end(mitmdump("--client-replay", str(SAMPLE), "-s", str(ADDON), "-w", str(out),
                        "--set", f"llm_ha_profile={simple_profile(tmp_path, fallback.url, primary.url)}",
                        confdir=confdir, port=free_port()))
    recorded, replayed = read_flows(SAMPLE), read_flows(out)
    assert len(replayed) == len(recorded)
    assert {f.response.headers["x-llm-ha-upstream"] for f in replayed} == {"primary"}
    assert {f.response.headers["x-llm-ha-attempts"] for f in replayed} == {"1"}
    assert {f.metadata["llm_ha"]["attempts"][0]["node"] for f in replayed} == {primary.url}
    assert primary.stats()["requests"] == len(recorded) and fallback.stats()["requests"] == 0
    assert sorted(f.request.content for f in replayed) == sorted(f.request.content for f in recorded)


def extract_primary_answers(tmp_path) -> tuple[Path, list]:
    """The recipe's first step: keep the answers the primary gave."""
    primary_only = tmp_path / "primary.flows"
    run_to_end(mitmdump("-n", "-r", str(SAMPLE), "-w", str(primary_only), "~hs 'x-llm-ha-upstream: primary'"))
    flows = read_flows(primary_only)
    assert flows and all(f.metadata["llm_ha"]["upstream"] == "primary" for f in flows)
    return primary_only, flows


# Match recorded requests by method, path and body (the recorded host and port were another run's);
# keep serving once the recording is used up; never connect to the (absent) target before a request.
SERVER_REPLAY = ["--set", "server_replay_ignore_host=true", "--set", "server_replay_ignore_port=true",
                 "--set", "keepserving=true", "--set", "connection_strategy=lazy"]


def stream_recorded(client: httpx.Client, flow) -> httpx.Response:
    response = client.post(flow.request.path, content=flow.request.raw_content,
                           headers={"content-type": "application/json"})
    response.read()
    return response


@pytest.mark.e2e
def test_server_replay_stands_in_for_the_primary_behind_llm_ha(tmp_path, simulators, proxies, background, confdir):
    primary_only, flows = extract_primary_answers(tmp_path)
    flows = flows[:4]
    stand_in_port = free_port()
    background(mitmdump("--mode", f"reverse:http://127.0.0.1:{free_port()}", "-S", str(primary_only), *SERVER_REPLAY,
                        "--set", "server_replay_extra=kill",
                        "--modify-headers", "/~s/x-llm-ha-upstream/", "--modify-headers", "/~s/x-llm-ha-attempts/",
                        confdir=confdir, port=stand_in_port), stand_in_port)
    fallback = simulators("--preset", "fallback")
    proxy = proxies(simple_profile(tmp_path, fallback.url).read_text(), reverse=f"http://127.0.0.1:{stand_in_port}")

    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        answers = [stream_recorded(client, f) for f in flows]
        assert [a.headers.get_list("x-llm-ha-upstream") for a in answers] == [["primary"]] * len(flows)
        assert [a.content for a in answers] == [f.response.content for f in flows]
        unrecorded = client.post("/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "new"}]})
    assert unrecorded.headers["x-llm-ha-upstream"] == "fallback" and unrecorded.headers["x-llm-ha-attempts"] == "2"
    assert fallback.stats()["requests"] == 1


@pytest.mark.e2e
def test_server_replay_in_the_llm_ha_mitmdump_answers_before_the_gate(tmp_path, simulators, proxies, confdir):
    primary_only, flows = extract_primary_answers(tmp_path)
    primary, fallback = simulators("--no-physics"), simulators("--preset", "fallback")
    out = tmp_path / "served.flows"
    proxy = proxies(simple_profile(tmp_path, fallback.url).read_text(), reverse=primary.url,
                    args=["-S", str(primary_only), *SERVER_REPLAY, "-w", str(out)])

    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        replayed = stream_recorded(client, flows[0])
        assert replayed.content == flows[0].response.content
        assert primary.stats()["requests"] == 0 and fallback.stats()["requests"] == 0
        fresh = client.post("/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "new"}]})
    assert fresh.headers["x-llm-ha-upstream"] == "primary" and primary.stats()["requests"] == 1
    proxy.stop()
    written = read_flows(out)
    assert [("llm_ha" in f.metadata, f.is_replay) for f in written] == [(False, "response"), (True, None)]
