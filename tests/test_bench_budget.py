"""bench-budget's profiles and options: pure, no processes (the benchmark itself is `make bench-budget`)."""

from __future__ import annotations

import pytest

from llmbench import bench_budget
from llmha.core.profile import load_profile

PRIMARIES = ["http://127.0.0.1:1001", "http://127.0.0.1:1002", "http://127.0.0.1:1003", "http://127.0.0.1:1004"]
FALLBACK = "http://127.0.0.1:1005"


def written_profile(tmp_path, scenario: str, variant: str):
    spec = bench_budget.SCENARIOS[scenario]
    path = tmp_path / f"{scenario}-{variant}.yaml"
    path.write_text(bench_budget.profile_text(spec, bench_budget.VARIANTS[variant],
                                              PRIMARIES[:spec.primary_nodes], FALLBACK, 0.15))
    return load_profile(path)


def test_scenario_a_keeps_the_documents_ejection(tmp_path):
    profile = written_profile(tmp_path, "eject", "budget")
    assert profile.health_check.failure_rate_threshold == 50
    assert profile.health_check.min_requests == 1
    assert profile.upstreams[0].nodes == tuple(PRIMARIES[:2])
    assert profile.upstreams[0].max_attempts == 3


def test_scenario_b_turns_ejection_off_and_lets_a_request_try_every_node(tmp_path):
    profile = written_profile(tmp_path, "no-eject", "budget")
    assert profile.health_check.failure_rate_threshold == 100
    assert profile.health_check.min_requests == 1_000_000
    assert profile.upstreams[0].nodes == tuple(PRIMARIES)
    assert profile.upstreams[0].max_attempts == 4
    assert profile.retry_budget.percent == 20


@pytest.mark.parametrize("scenario", ["eject", "no-eject"])
def test_the_variants_change_only_the_budget_and_hedging(tmp_path, scenario):
    off = written_profile(tmp_path, scenario, "no-budget")
    hedge = written_profile(tmp_path, scenario, "hedge")
    assert (off.retry_budget.percent, off.retry_budget.min_per_s) == (100, 1000)
    assert off.upstreams[0].hedge_after is None
    assert hedge.upstreams[0].hedge_after == pytest.approx(0.15)
    assert hedge.retry_budget == written_profile(tmp_path, scenario, "budget").retry_budget


def test_scenario_option():
    assert bench_budget.parse_args([]).scenarios == ["eject", "no-eject"]
    assert bench_budget.parse_args(["--scenario", "no-eject"]).scenarios == ["no-eject"]
    with pytest.raises(SystemExit):
        bench_budget.parse_args(["--scenario", "nope"])
