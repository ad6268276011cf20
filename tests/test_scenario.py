"""The spike scenario (`make demo`, `make bench-spike`): its computations, its PNG, and a short real run."""

from __future__ import annotations

import csv

import pytest

from llmbench.bench_spike import build_table, row_values, verdicts, write_csv
from llmbench.scenario import (
    VARIANTS,
    RunResult,
    SpikeLoad,
    describe_scale,
    down_periods,
    ejection_periods,
    estimated_capacity,
    primary_possible,
    profile_text,
    run_scenario,
    served_by,
    summarize_run,
)
from llmha.core.profile import load_profile
from llmsim.loadgen import Record

T0 = 1_000_000.0


def record(i: int, at: float, phase: str = "steady", ttft: float | None = 0.05, outcome: str = "ok",
           upstream: str | None = "primary", attempts: int | None = 1) -> Record:
    return Record(id=i, phase=phase, scheduled=T0 + at, start=T0 + at, ttft=ttft if outcome == "ok" else None,
                  end=T0 + at + 1.0, outcome=outcome, upstream=upstream, attempts=attempts)


def synthetic_result(scale: float = 1.0) -> RunResult:
    """A small made-up run: 4 by the primary, 3 by the fallback (one retried), 2 failed, one crash, one ejection."""
    records = [
        record(0, 1.0, ttft=0.040), record(1, 2.0, ttft=0.060),
        record(2, 16.0, "spike", ttft=0.300, upstream="fallback", attempts=2),
        record(3, 16.5, "spike", ttft=0.080, upstream="fallback"),
        record(4, 17.0, "spike", ttft=0.090, upstream="fallback"),
        record(5, 17.5, "spike", outcome="InternalServerError:504", upstream="none"),
        record(6, 18.0, "spike", outcome="APIConnectionError", upstream=None),
        record(7, 50.0, "after", ttft=0.050, upstream="DeepSeek-R1-Distill-Qwen-7B"),  # straight to the primary
        record(8, 51.0, "after", ttft=0.070),
    ]
    events = [
        {"ts": T0 + 16.8, "action": "failover", "upstream": "primary", "node": "n", "k": 1, "duration_s": None,
         "failure_rate": None},
        {"ts": T0 + 17.0, "action": "eject", "upstream": "primary", "node": "n", "k": 1, "duration_s": 30.0,
         "failure_rate": 75.0},
        {"ts": T0 + 47.1, "action": "uneject", "upstream": "primary", "node": "n", "k": 1, "duration_s": None,
         "failure_rate": None},
        {"ts": T0 + 60.0, "action": "eject", "upstream": "primary", "node": "n", "k": 2, "duration_s": 60.0,
         "failure_rate": 100.0},
        {"ts": T0 + 20.0, "action": "eject", "upstream": "fallback", "node": "f", "k": 1, "duration_s": 30.0,
         "failure_rate": 60.0},
    ]
    return RunResult(variant=VARIANTS["llm-ha"], scale=scale, seed=1, load=SpikeLoad(), t0=T0, t_end=T0 + 80.0,
                     records=records, primary_stats={"crash_times": [T0 + 18.0], "peak_queue": 35, "peak_batch": 16},
                     fallback_stats={}, events=events, restart_s=180.0 * scale, first_byte_timeout_s=0.2 * scale)


# -- the computations


def test_served_by_reads_the_header_or_the_model_and_none_for_failures():
    assert served_by(record(0, 0, upstream="primary")) == "primary"
    assert served_by(record(0, 0, upstream="DeepSeek-R1-Distill-Qwen-7B")) == "primary"
    assert served_by(record(0, 0, upstream="qwen-plus")) == "fallback"
    assert served_by(record(0, 0, outcome="incomplete")) is None  # the stream broke: the client saw it fail


def test_summary_counts_failures_upstreams_ttft_crashes_and_ejections():
    s = summarize_run(synthetic_result())
    assert (s["requests"], s["succeeded"], s["failed"]) == (9, 7, 2)
    assert s["failures_by_outcome"] == {"InternalServerError:504": 1, "APIConnectionError": 1}
    assert (s["by_primary"], s["by_fallback"]) == (4, 3)
    assert s["primary_share"] == pytest.approx(4 / 9)
    assert s["ttft_p50_ms"] == pytest.approx(70.0)  # of 40, 50, 60, 70, 80, 90, 300
    assert s["ttft_max_ms"] == pytest.approx(300.0)
    assert s["primary_crashes"] == 1 and s["crash_offsets_s"] == [18.0]
    assert s["primary_down_s"] == 180.0 and s["primary_down_doc_s"] == 180.0
    assert s["primary_down_in_run_s"] == pytest.approx(62.0)  # the run ended 62 s after the crash
    assert [(e["k"], e["duration_s"], e["returned"]) for e in s["ejections"]] == [(1, 30.0, True), (2, 60.0, False)]
    assert s["failovers"] == 1


def test_summary_in_document_time_at_another_scale():
    s = summarize_run(synthetic_result(scale=0.5))
    assert s["primary_down_s"] == 90.0 and s["primary_down_doc_s"] == 180.0


def test_down_periods_last_the_restart_time_and_never_overlap():
    assert down_periods([], 180) == []
    assert down_periods([300.0, 100.0], 180) == [(100.0, 280.0), (300.0, 480.0)]
    assert down_periods([100.0, 150.0], 180) == [(100.0, 330.0)]  # clocks disagreeing: merged, not double counted


def test_ejection_periods_pair_returns_and_clip_the_running_one():
    events = synthetic_result().events
    periods = ejection_periods(events, "primary", until=T0 + 80.0)
    assert [(p["start"] - T0, round(p["end"] - T0, 1), p["k"]) for p in periods] == [(17.0, 47.1, 1), (60.0, 80.0, 2)]
    assert [p["k"] for p in ejection_periods(events, "fallback")] == [1]


def test_primary_possible_caps_each_phase_at_the_capacity():
    load = SpikeLoad(before_s=10, spike_s=10, after_s=10, steady_rate=2, spike_rate=14)
    records = ([record(i, i, "steady") for i in range(20)] + [record(i, 10, "spike") for i in range(140)]
               + [record(i, 25, "after") for i in range(18)])
    assert primary_possible(records, load, scale=1.0, capacity=5.0) == 20 + 50 + 18
    assert primary_possible(records, load, scale=0.5, capacity=5.0) == 20 + 50 + 18  # capacity in document time
    s = summarize_run(RunResult(variant=VARIANTS["limits"], scale=1.0, seed=1, load=load, t0=T0, t_end=T0 + 30,
                                records=records, primary_stats={}, fallback_stats={}, events=[], restart_s=180,
                                first_byte_timeout_s=0.2), capacity=5.0)
    assert s["primary_possible"] == 88 and s["primary_vs_possible"] == pytest.approx(178 / 88)


def test_load_phases_scale_durations_and_rates():
    load = SpikeLoad(steady_rate=2, spike_rate=14, before_s=15, spike_s=20, after_s=45)
    phases = load.phases(scale=0.5, spike_factor=2)
    assert [(p.name, p.duration, p.rate) for p in phases] == [("steady", 7.5, 4), ("spike", 10, 56), ("after", 22.5, 4)]
    assert load.spike_window(0.5) == (7.5, 17.5)
    assert load.duration == 80


def test_capacity_estimate_from_the_physics():
    assert estimated_capacity(64) == pytest.approx(4.76, abs=0.05)  # the simulator's "about 5 requests/s"
    assert estimated_capacity(64) < estimated_capacity(32) < 2 * estimated_capacity(64)  # prefill stalls weigh more


def test_describe_scale_says_how_time_runs():
    assert describe_scale(0.1).startswith("time runs 10x faster (time scale 0.1): the 180 s restart takes 18 s; "
                                          "the profile's 30 s base ejection is 3 s")
    assert "200 ms first-byte timeout 20 ms" in describe_scale(0.1)
    assert "document's pace" in describe_scale(1.0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_written_profile_loads_with_scaled_reference_values(tmp_path, name):
    path = tmp_path / "profile.yaml"
    text = profile_text(VARIANTS[name], 0.5, "http://127.0.0.1:9")
    assert text.startswith("# demo-spike: ")
    path.write_text(text)
    profile = load_profile(path, env={}, reverse_target="http://127.0.0.1:8")
    hc = profile.health_check
    assert (hc.failure_rate_threshold, hc.interval, hc.base_ejection_time, hc.max_ejection_time) == (50, 0.5, 15, 150)
    primary, fallback = profile.upstreams
    assert primary.nodes == ("http://127.0.0.1:8",) and fallback.nodes == ("http://127.0.0.1:9",)
    assert (primary.first_byte_timeout, fallback.first_byte_timeout) == (0.1, 2.5)
    assert profile.transparent_failover == VARIANTS[name].transparent_failover
    if VARIANTS[name].limits:
        assert (primary.max_inflight, primary.adaptive, primary.slow_start) == (16, VARIANTS[name].adaptive, 15)
    else:
        assert primary.max_inflight is None


def test_bench_rows_csv_and_verdicts(tmp_path):
    s = summarize_run(synthetic_result(), capacity=4.7)
    cells = row_values(3, s)
    assert cells["run"] == "(3) llm-ha"
    assert (cells["failed"], cells["primary_crashes"], cells["primary_down_doc_s"]) == ("2", "1", "180")
    assert cells["ejections_text"] == "1: 30, 2: 60"
    assert build_table([(3, s)], "t").row_count == 1
    write_csv([(3, s)], tmp_path / "t.csv")
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert rows[0]["variant"] == "llm-ha" and rows[0]["failed"] == "2" and rows[0]["ejections"] == "k1:30s k2:60s"
    none = dict(s, variant="none", primary_crashes=1)
    [line] = verdicts({"llm-ha": s, "none": none})
    assert line.startswith("MISSED: (3)")
    good = dict(s, failed=0, primary_crashes=0)
    assert verdicts({"llm-ha": good, "none": none})[0].startswith("MET: (3)")
    limits = dict(good, variant="limits", primary_vs_possible=0.85, primary_possible=100.0, by_primary=85)
    assert verdicts({"limits": limits})[0].startswith("MISSED")
    assert verdicts({"limits": dict(limits, primary_vs_possible=0.93)})[0].startswith("MET")


# -- the PNG


def test_timeline_png(tmp_path):
    pytest.importorskip("matplotlib")
    from llmbench.timeline import per_second, write_timeline

    path = write_timeline(synthetic_result(), tmp_path / "deep" / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    centres, counts = per_second(synthetic_result())
    assert len(centres) == 80 and sum(counts["primary"]) == 4 and sum(counts["failed"]) == 2
    assert counts["fallback"][16] == 2  # sent in the 17th second
    write_timeline(synthetic_result(scale=0.5), tmp_path / "scaled.png")  # with the document-time axis


def test_timeline_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    from llmbench.timeline import PlotUnavailable, write_timeline

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install -e '\.\[plot\]'"):
        write_timeline(synthetic_result(), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


# -- a short real run: the same seeded spike with and without llm-ha

SHORT = SpikeLoad(steady_rate=2.0, spike_rate=14.0, before_s=3.0, spike_s=8.0, after_s=3.0, max_tokens=64)


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_the_spike_crashes_the_bare_primary_and_llm_ha_serves_every_request(tmp_path, confdir):
    protected = run_scenario(VARIANTS["llm-ha"], scale=1.0, seed=3, load=SHORT, out_dir=tmp_path / "llm-ha",
                             confdir=confdir, settle_s=0.3)
    bare = run_scenario(VARIANTS["none"], scale=1.0, seed=3, load=SHORT, out_dir=tmp_path / "none",
                        settle_s=0.1)
    with_ha, without = summarize_run(protected), summarize_run(bare)
    assert with_ha["requests"] == without["requests"] > 100  # the same seeded load
    assert without["primary_crashes"] >= 1, without
    assert without["failed"] > 0
    assert with_ha["failed"] == 0, with_ha["failures_by_outcome"]
    assert with_ha["primary_crashes"] == 0
    assert with_ha["by_fallback"] > 0 and with_ha["by_primary"] > 0
    assert with_ha["ejections"] and with_ha["ejections"][0]["k"] == 1, with_ha
    assert (tmp_path / "llm-ha" / "profile.yaml").read_text().startswith("# demo-spike: ")
    assert (tmp_path / "llm-ha" / "records.jsonl").exists() and (tmp_path / "llm-ha" / "events.jsonl").exists()


def test_demo_summary_table_shows_the_figures():
    from rich.console import Console

    from llmbench.demo import summary_table

    console = Console(record=True, width=140)
    console.print(summary_table(summarize_run(synthetic_result())))
    text = console.export_text()
    for expected in ("requests sent", "9", "failed (client-visible)", "served by the primary", "44.4 %",
                     "time to first token p95", "primary crashes", "down 180 s", "k=1", "for 30 s from t=17.0 s",
                     "k=2", "still ejected at the end"):
        assert expected in text, (expected, text)
