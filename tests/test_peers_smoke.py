"""The bench-peers harness (llmbench.peers, llmbench.bench_peers), for a few seconds per gateway, so it cannot rot.

Each gateway is started for real in front of the two simulators, gets a few seconds of the spike load
with the primary crashed mid-way, and is stopped; then the command line runs a quick benchmark and
writes its table, CSV, JSON and PNG. The tests install nothing: a gateway not installed here is
skipped with the reason (install both with `make peers`; nginx alone: `apt-get install -y nginx`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest
import yaml

from llmbench import bench_peers, peers
from llmbench.bench_peers import Row, is_truncated, run_spike, summarize_profile, table, targets
from llmbench.scenario import REFERENCE, SpikeLoad
from llmha.core.profile import parse_profile
from llmsim.loadgen import Record

pytestmark = pytest.mark.e2e

TINY = SpikeLoad(steady_rate=2, spike_rate=14, before_s=1.5, spike_s=1.5, after_s=1.5, max_tokens=16)
CRASH_AT = 1.0  # seconds into the load: the primary is serving, the spike is still to come


def available(name: str) -> None:
    """Skip, with the reason, when the peer is not installed here."""
    try:
        if name.startswith("nginx"):
            peers.ensure_nginx(install=False)
        elif name == "litellm":
            peers.ensure_litellm(install=False)
    except peers.PeerUnavailable as exc:
        pytest.skip(f"{name} is not available here: {exc}")


def leftover_children() -> list[int]:
    return [pid for pid in peers.process_tree(os.getpid()) if pid != os.getpid()]


# -- configs (no processes)

def test_every_gateway_gets_the_reference_settings(tmp_path):
    s = peers.Settings.of(REFERENCE, 1.0)
    conf = peers.nginx_conf(s, "http://127.0.0.1:1001", "http://127.0.0.1:1002", 1234)
    assert "listen 127.0.0.1:1234;" in conf
    assert "server 127.0.0.1:1001 max_fails=1 fail_timeout=30s;" in conf
    assert "server 127.0.0.1:1002 backup;" in conf
    assert "proxy_read_timeout 200ms;" in conf and "proxy_buffering off;" in conf
    assert "proxy_next_upstream error timeout http_500 http_502 http_503 http_429 non_idempotent;" in conf
    assert "keepalive 64;" in conf and 'proxy_set_header Connection "";' in conf
    practical = peers.nginx_conf(s, "http://127.0.0.1:1001", "http://127.0.0.1:1002", 1234, read_timeout=1.0)
    assert "proxy_read_timeout 1000ms;" in practical and "proxy_connect_timeout 200ms;" in practical

    lite = peers.litellm_config(s, "http://127.0.0.1:1001", "http://127.0.0.1:1002")
    primary, fallback = lite["model_list"]
    assert primary["model_name"] == peers.PRIMARY_MODEL
    assert primary["litellm_params"]["api_base"] == "http://127.0.0.1:1001/v1"
    assert primary["litellm_params"]["stream_timeout"] == pytest.approx(0.2)
    assert fallback["litellm_params"]["stream_timeout"] == pytest.approx(5.0)
    router = lite["router_settings"]
    assert router["fallbacks"] == [{peers.PRIMARY_MODEL: ["fallback"]}]
    assert router["num_retries"] == 0 and router["allowed_fails"] == 0 and router["cooldown_time"] == 30

    profile = parse_profile(yaml.safe_load(peers.llm_ha_profile("llm-ha", s, "http://127.0.0.1:1002")),
                            "bench.yaml", {}, "http://127.0.0.1:1001")
    assert profile.first_byte_timeout == pytest.approx(0.2)
    assert profile.health_check.base_ejection_time == pytest.approx(30)

    half = peers.Settings.of(REFERENCE, 0.5)  # time-scaled like the simulators
    assert "fail_timeout=15s" in peers.nginx_conf(half, "http://a:1", "http://b:2", 1)
    assert peers.litellm_config(half, "http://a:1", "http://b:2")["router_settings"]["cooldown_time"] == 15


def test_report_pieces():
    ok = Record(id=0, phase="p", scheduled=0, start=0, ttft=0.1, end=1, outcome="ok", chunks=17)
    cut = Record(id=1, phase="p", scheduled=0, start=0, ttft=0.1, end=1, outcome="ok", chunks=9)
    assert not is_truncated(ok, 16) and is_truncated(cut, 16)
    rows = [Row("llm-ha", "spike", requests=10, primary_crashes=0, primary_share=0.8),
            Row("nginx", "spike", requests=10, failed=10, errors=10, primary_crashes=0, primary_share=0.0),
            Row("litellm", "spike", error="unavailable: no venv")]
    assert [met for _, met, _ in targets(rows)] == [True, True, True, True]
    assert table(rows, "t").row_count == 3
    prof = summarize_profile("<module> (mitmdump);run (asyncio/runners.py);f (addons/llmha/gate.py) 3\n"
                             "<module> (mitmdump);select (selectors.py) 5\n")
    assert prof["samples"] == 3 and prof["idle_samples"] == 5 and prof["self"][0][0].endswith("gate.py:f")


# -- each gateway for real

@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["llm-ha", "mitmdump", "nginx-1s", "litellm"])  # nginx 200ms cuts every stream
def test_gateway_survives_a_crash_of_the_primary(name, tmp_path, confdir):
    available(name)
    row = run_spike(name, "primary-dies", load=TINY, crash_at=CRASH_AT, out_dir=tmp_path, confdir=confdir,
                    install=False)
    assert row.error is None, row.error
    assert row.requests >= 10 and row.forced_crashes == 1 and row.primary_down_s > 0
    assert row.peak_rss_mib > 1 and row.cpu_s_per_1000 > 0
    records = [json.loads(line) for line in (tmp_path / "primary-dies" / name / "records.jsonl").open()]
    assert len(records) == row.requests
    if name == "mitmdump":  # no fallback: what comes after the crash fails
        assert row.failed > row.requests / 3
    else:  # the fallback answers once the primary is gone
        assert row.failed <= 3, row.failures_by_outcome
        assert row.primary_served < row.requests - row.failed
    assert not peers._LIVE and not leftover_children()


@pytest.mark.timeout(300)
def test_bench_peers_command_writes_its_table_and_files(tmp_path, capsys):
    available("litellm")
    out = tmp_path / "out"
    bench_peers.main(["--quick", "--peers", "llm-ha,litellm", "--scenarios", "spike", "--requests", "5",
                      "--no-profile", "--no-install", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bench-peers" in printed and "LiteLLM" in printed and "healthy, no spike" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["peer"], r["scenario"]) for r in rows] == [
        ("llm-ha", "spike"), ("litellm", "spike"), ("direct", "overhead"), ("llm-ha", "overhead"),
        ("litellm", "overhead")]
    assert all(not r["error"] for r in rows), [r["error"] for r in rows]
    assert (out / "bench-peers.png").stat().st_size > 10_000
    assert "| llm-ha | default spike |" in (out / "results.md").read_text()
    result = json.loads((out / "results.json").read_text())
    assert result["targets"] and result["mappings"]
    assert not peers._LIVE and not leftover_children()


def test_nginx_config_passes_nginx_t(tmp_path):
    available("nginx")
    prefix = tmp_path / "nginx"
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(peers.nginx_conf(peers.Settings.of(), "http://127.0.0.1:1", "http://127.0.0.1:2",
                                                        1))
    result = subprocess.run([peers.nginx_binary(), "-t", "-p", str(prefix), "-c", "nginx.conf"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
