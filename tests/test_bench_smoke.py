"""The overhead and soak benchmarks (`make bench-overhead`, `make bench-soak`) at their --quick sizes, so they
cannot rot: each starts its simulators and proxies for real, prints its tables, writes its JSON, exits 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmbench import bench_overhead
from llmbench.proxy import REPO

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 180.0  # s; each takes well under a minute on an idle 2-core machine


def run_bench(module: str, out_dir, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out_dir), *args],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def only_json(out_dir, pattern: str) -> dict:
    [path] = out_dir.glob(pattern)
    return json.loads(path.read_text())


def test_bench_overhead_quick_prints_every_part(tmp_path):
    out = run_bench("llmbench.bench_overhead", tmp_path)
    for title in ("Per streamed chunk", "Concurrency sweep", "Per request", "Start-up", "Targets (issue 18)",
                  "Peak RSS", "Noise:"):
        assert title in out, out
    result = only_json(tmp_path, "bench-overhead-*.json")
    assert result["errors"] == {}
    figures = result["figures"]
    for key in ("paced_cpu_ms_per_1k", "fast_cpu_ms_per_1k", "fast_tokens_per_s", "sweep10_ttft_p99_ms",
                "sweep10_gap_p99_ms", "request_added_ttft_ms", "request_cpu_ms", "startup_ms"):
        assert figures[key]["llm-ha"]["median"] > 0, key
        assert len(figures[key]["ratio_llm_ha_to_mitmdump"]) == len(figures[key]["llm-ha"]["rounds"]), key
    assert set(result["peak_rss_kib"]["sweep"]) == {"mitmdump", "llm-ha"}


def test_bench_overhead_runs_only_the_parts_asked_for(tmp_path):
    out = run_bench("llmbench.bench_overhead", tmp_path, "--only", "startup", "--startup-rounds", "1")
    assert "Start-up" in out and "Concurrency sweep" not in out
    assert set(only_json(tmp_path, "bench-overhead-*.json")["figures"]) == {"startup_ms"}


def test_bench_overhead_refuses_an_unknown_part(capsys):
    with pytest.raises(SystemExit):
        bench_overhead.parse_args(["--only", "sweep,warp"])
    assert "unknown part(s) warp" in capsys.readouterr().err


def test_bench_soak_quick_reports_growth_errors_and_inflight(tmp_path):
    out = run_bench("llmbench.bench_soak", tmp_path, "--requests", "200")
    assert "over the soak" in out and "Soak targets" in out, out
    summary = only_json(tmp_path, "bench-soak-*.json")["summary"]
    assert summary["requests"] == 200
    assert summary["client_errors"] == 0, summary["first_error"]
    assert summary["inflight_at_end"] == 0
    assert summary["rss_first_mib"] > 0 and summary["fds_first"] > 0
