"""What ships for operating llm-ha: metric names, alert rules, the Grafana dashboard, the container files.

The container is not built here (no Docker engine); its files are checked against the repository.
promtool (Debian's `prometheus` package) checks the rules and the metrics; without it those tests skip.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmha.statusserver import _StatusCollector

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
METRIC_NAME = re.compile(r"\bllm_ha_[a-z0-9_]+")


def full_status(**changes) -> dict:
    """A status document with every optional part present (limits, TTFB, shared state)."""
    node = {"url": "http://127.0.0.1:8001", "state": "ejected", "k": 2, "ejections": 2, "ejected_remaining_s": 41.5,
            "failure_rate": 75.0, "requests": 40, "inflight": 3, "ttfb_p50_ms": 120.0, "ttfb_p95_ms": 180.5,
            "failures": 30, "requests_per_s": 4.0, "ttfb_history_ms": [None, 120.0], "limit": 8, "shed": 5}
    fallback = {**node, "url": "http://127.0.0.1:8002", "state": "healthy", "k": 1, "limit": None,
                "ttfb_p50_ms": None, "ttfb_p95_ms": None}
    status = {
        "now": 1.0, "instance": "gw-1",
        "profile": {"name": "reference", "failure_rate_threshold": 50.0, "interval_s": 1.0,
                    "base_ejection_time_s": 30.0, "max_ejection_time_s": 300.0, "first_byte_timeout_ms": 200.0},
        "upstreams": [{"name": "primary", "first_byte_timeout_ms": 200.0, "nodes": [node]},
                      {"name": "fallback", "first_byte_timeout_ms": 5000.0, "nodes": [fallback]}],
        "failovers": 12, "events": [], "proxy": {"loop_lag_ms": 12.5},
        "shared_state": {"url": "redis://127.0.0.1:6379/0", "state": "degraded"},
    }
    return {**status, **changes}


def metrics_text(status: dict) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(lambda: status))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exposed_names() -> set[str]:
    return {name for name, _ in samples(metrics_text(full_status()))}


def test_metrics_follow_prometheus_units_and_counter_conventions():
    values = samples(metrics_text(full_status()))
    primary = (("node", "http://127.0.0.1:8001"), ("upstream", "primary"))
    assert values[("llm_ha_node_failure_ratio", primary)] == 0.75
    assert values[("llm_ha_node_ttfb_p95_seconds", primary)] == pytest.approx(0.1805)
    assert values[("llm_ha_node_inflight_limit", primary)] == 8
    assert values[("llm_ha_node_attempts_total", primary)] == 40
    assert values[("llm_ha_failure_ratio_threshold", ())] == 0.5
    assert values[("llm_ha_upstream_first_byte_timeout_seconds", (("upstream", "fallback"),))] == 5
    assert values[("llm_ha_upstream_nodes_available", (("role", "primary"), ("upstream", "primary")))] == 0
    assert values[("llm_ha_upstream_nodes_available", (("role", "fallback"), ("upstream", "fallback")))] == 1
    assert values[("llm_ha_shared_state_degraded", ())] == 1
    assert values[("llm_ha_event_loop_lag_seconds", ())] == 0.0125
    info = [labels for name, labels in values if name == "llm_ha_info"]
    assert dict(info[0]).keys() == {"instance_id", "profile", "version"}  # not `instance`: Prometheus' own label
    names = {name for name, _ in values}
    assert not any(re.search(r"_(ms|percent|rate_percent)$", name) for name in names)
    assert ("llm_ha_node_inflight_limit", (("node", "http://127.0.0.1:8002"), ("upstream", "fallback"))) not in values


def test_without_a_profile_or_shared_state_the_optional_metrics_are_absent():
    names = {name for name, _ in samples(metrics_text({"upstreams": [], "failovers": 0}))}
    assert names == {"llm_ha_info", "llm_ha_failovers_total", "llm_ha_event_loop_lag_seconds"}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=30, cwd=DEPLOY)


def test_promtool_finds_the_metrics_clean():
    result = promtool("check", "metrics", stdin=metrics_text(full_status()))
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_promtool_accepts_the_alert_rules_the_config_and_the_rules_unit_tests():
    for args in (("check", "rules", "prometheus/alerts.yml"), ("check", "config", "prometheus/prometheus.yml"),
                 ("test", "rules", "prometheus/alerts_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_alerts_cover_what_operators_page_on():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "LlmHaNodeEjectedLong", "LlmHaPrimaryDown", "LlmHaFailoverRateHigh", "LlmHaEventLoopLagHigh",
        "LlmHaSharedStateDegraded"}


def test_the_dashboard_and_the_alerts_use_only_metrics_llm_ha_exposes():
    dashboard_text = (DEPLOY / "grafana" / "llm-ha.json").read_text()
    dashboard = json.loads(dashboard_text)
    assert dashboard["uid"] == "llm-ha" and dashboard["panels"]
    assert all(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    used = set(METRIC_NAME.findall(dashboard_text)) | set(METRIC_NAME.findall(
        (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    assert used and used <= exposed_names(), used - exposed_names()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_every_file_the_dockerfile_copies_exists_and_its_entry_point_is_llm_ha():
    instructions = dockerfile_instructions()
    copies = [shlex.split(arguments) for kind, arguments in instructions if kind == "COPY"]
    sources = [source for words in copies if not words[0].startswith("--from=") for source in words[:-1]]
    assert sources and all((REPO / source).exists() for source in sources), sources
    for package in ("addons/llmha", "sim/llmsim"):
        assert any(package.startswith(source.rstrip("/")) for source in sources), package
    entrypoints = [json.loads(arguments) for kind, arguments in instructions if kind == "ENTRYPOINT"]
    assert entrypoints == [["llm-ha"]]
    final_stage = instructions[max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM"):]
    assert re.match(r"python:3\.12-slim\b", final_stage[0][1])
    users = [arguments for kind, arguments in final_stage if kind == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_compose_example_mounts_files_that_exist_and_publishes_on_loopback_only():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"llm-ha", "primary", "fallback", "prometheus", "grafana"} <= services.keys()
    assert (DEPLOY / services["llm-ha"]["build"]["context"] / services["llm-ha"]["build"]["dockerfile"]).exists()
    for service in services.values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    command = services["llm-ha"]["command"]
    assert command[0] == "run" and (REPO / command[1].replace("/profiles/", "profiles/")).exists()
