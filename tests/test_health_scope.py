"""Health per (node, model) for a hosted API (`health_scope: model`), one unit per self-hosted node (`node`).

Pure: the pool, the picker and the detector on a fake clock (and promtool, if installed, on the metrics).
"""

import shutil
import subprocess
import textwrap

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from llmha.core.candidates import CandidatePicker
from llmha.core.health import HealthEvent
from llmha.core.nodes import MAX_MODEL_NAME, MAX_MODELS_PER_NODE, NodePool
from llmha.core.profile import HealthCheck, ProbeSettings, Profile, ProfileError, Upstream, load_profile
from llmha.core.status import build_status, status_table
from llmha.core.types import NodeId, Outcome
from llmha.panel import build_panel
from llmha.statusserver import _StatusCollector

T0 = 1_000_000.0
SELF_HOSTED = Upstream("primary", ("http://127.0.0.1:1",))
HOSTED = Upstream("hosted", ("http://127.0.0.1:2",), first_byte_timeout=5.0, health_scope="model")
PRIMARY, PROVIDER = NodeId("primary", "http://127.0.0.1:1"), NodeId("hosted", "http://127.0.0.1:2")
CHECK = HealthCheck(interval=1.0, base_ejection_time=30.0)


def setup(*upstreams: Upstream, probe: bool = False):
    events: list[HealthEvent] = []
    profile = Profile(path="scope.yaml", upstreams=upstreams or (SELF_HOSTED, HOSTED), health_check=CHECK,
                      probe=ProbeSettings(enabled=probe))
    return CandidatePicker(profile), NodePool(profile, T0, listener=events.append), events


def attempt(picker, pool, model, outcome, now, upstream="hosted"):
    """One request for `model`: a lease on its candidate of `upstream`, released with `outcome`."""
    candidate = next(c for c in picker.candidates(pool, now, model) if c.upstream.name == upstream)
    lease = pool.try_acquire(candidate.node, now, streamed=True, health=candidate.health)
    lease.release(outcome, now)
    return candidate


def nodes_for(picker, pool, model, now):
    return [c.node for c in picker.candidates(pool, now, model)]


def test_a_rate_limited_model_is_out_on_the_hosted_node_and_another_model_still_goes_there():
    picker, pool, events = setup(HOSTED)
    for i in range(3):
        attempt(picker, pool, "model-a", Outcome.RATE_LIMITED, T0 + 0.1 + i * 0.1)
        attempt(picker, pool, "model-b", Outcome.OK, T0 + 0.15 + i * 0.1)
    pool.advance(T0 + 1.01)

    assert not pool.is_available(PROVIDER.for_model("model-a"), T0 + 1.01)
    assert pool.is_available(PROVIDER, T0 + 1.01) and pool.is_available(PROVIDER.for_model("model-b"), T0 + 1.01)
    assert nodes_for(picker, pool, "model-b", T0 + 1.1) == [PROVIDER]
    candidate = picker.candidates(pool, T0 + 1.1, "model-b")[0]
    assert candidate.health == PROVIDER.for_model("model-b")
    [eject] = [e for e in events if e.action == "eject"]
    assert (eject.node, eject.model, eject.k, eject.failure_rate) == (PROVIDER.url, "model-a", 1, 100.0)
    assert eject.to_dict()["model"] == "model-a"


def test_with_model_a_out_everywhere_its_requests_still_try_it_as_in_panic():
    picker, pool, _ = setup(HOSTED)
    attempt(picker, pool, "model-a", Outcome.HTTP_ERROR, T0 + 0.1)
    pool.advance(T0 + 1.01)
    [only] = picker.candidates(pool, T0 + 1.1, "model-a")
    assert only.node == PROVIDER and only.health == PROVIDER.for_model("model-a")


def test_the_self_hosted_primary_stays_one_unit_whatever_the_model():
    picker, pool, events = setup()
    for i in range(3):
        attempt(picker, pool, "model-a", Outcome.TIMEOUT, T0 + 0.1 + i * 0.1, upstream="primary")
        attempt(picker, pool, "model-b", Outcome.OK, T0 + 0.15 + i * 0.1, upstream="primary")
    pool.advance(T0 + 1.01)

    assert not pool.is_available(PRIMARY, T0 + 1.01)
    assert nodes_for(picker, pool, "model-b", T0 + 1.1) == [PROVIDER]  # failed over for every model
    assert [(e.node, e.model) for e in events if e.action == "eject"] == [(PRIMARY.url, None)]
    assert pool.model_entries(PRIMARY) == [] and "models" not in pool.snapshot(PRIMARY, T0 + 1.1)


def test_an_unreachable_hosted_endpoint_is_out_for_every_model_at_once():
    picker, pool, _ = setup(SELF_HOSTED, HOSTED)
    attempt(picker, pool, "model-a", Outcome.CONNECT_ERROR, T0 + 0.1)
    attempt(picker, pool, "model-b", Outcome.OK, T0 + 0.2)
    pool.advance(T0 + 1.01)
    assert not pool.is_available(PROVIDER, T0 + 1.01)  # half its attempts could not reach it: >= 50 %
    assert pool.is_available(PROVIDER.for_model("model-a"), T0 + 1.01)  # nothing said about model-a itself
    assert nodes_for(picker, pool, "model-b", T0 + 1.1) == [PRIMARY]


def test_a_model_answer_failure_does_not_count_against_the_node():
    _, pool, _ = setup(HOSTED)
    entry = pool.health_entry(PROVIDER, "model-a", T0)
    pool.record(entry, Outcome.RATE_LIMITED, None, T0 + 0.1, True)
    snap = pool.snapshot(PROVIDER, T0 + 0.5)
    assert (snap["requests"], snap["failures"]) == (1, 0)
    assert (snap["models"]["model-a"]["requests"], snap["models"]["model-a"]["failures"]) == (1, 1)


def test_the_upstream_model_rewrite_names_the_entry():
    rewriting = Upstream("hosted", ("http://127.0.0.1:2",), model="qwen-plus", health_scope="model")
    _, pool, _ = setup(rewriting)
    assert pool.health_entry(PROVIDER, "whatever-the-client-said", T0) == PROVIDER.for_model("qwen-plus")
    assert pool.health_entry(PROVIDER, None, T0) == PROVIDER.for_model("qwen-plus")


def test_no_model_or_one_that_is_no_name_is_judged_with_the_node():
    _, pool, _ = setup(HOSTED)
    for requested in (None, "", 42, ["a"], "x" * (MAX_MODEL_NAME + 1)):
        assert pool.health_entry(PROVIDER, requested, T0) == PROVIDER
    assert pool.model_entries(PROVIDER) == []


def test_client_chosen_names_never_make_more_than_the_cap_of_entries():
    _, pool, _ = setup(HOSTED)
    for i in range(MAX_MODELS_PER_NODE):  # each with an attempt in the open interval: none is blank
        entry = pool.health_entry(PROVIDER, f"m{i}", T0)
        pool.record(entry, Outcome.OK, None, T0 + 0.1, True)
    assert pool.health_entry(PROVIDER, "one-too-many", T0 + 0.2) == PROVIDER  # folded into the node's
    assert len(pool.model_entries(PROVIDER)) == MAX_MODELS_PER_NODE

    pool.advance(T0 + 1.01)  # the interval closes: healthy entries with k = 1 hold nothing now
    assert pool.health_entry(PROVIDER, "one-too-many", T0 + 1.1) == PROVIDER.for_model("one-too-many")
    assert len(pool.model_entries(PROVIDER)) == MAX_MODELS_PER_NODE


def test_an_ejected_entry_is_never_the_one_dropped():
    _, pool, _ = setup(HOSTED)
    entries = [pool.health_entry(PROVIDER, f"m{i}", T0) for i in range(MAX_MODELS_PER_NODE)]
    for entry in entries:
        pool.eject(entry, T0 + 0.1)
    assert pool.health_entry(PROVIDER, "new", T0 + 0.2) == PROVIDER
    assert set(pool.model_entries(PROVIDER)) == set(entries)


def test_an_attempt_whose_entry_was_dropped_meanwhile_still_counts():
    _, pool, _ = setup(HOSTED)
    first = pool.health_entry(PROVIDER, "m-first", T0)
    lease = pool.try_acquire(PROVIDER, T0, streamed=True, health=first)
    for i in range(1, MAX_MODELS_PER_NODE + 1):
        pool.health_entry(PROVIDER, f"m{i}", T0)  # "m-first" is blank: dropped for the last one
    assert first not in pool.model_entries(PROVIDER)
    lease.release(Outcome.HTTP_ERROR, T0 + 0.5)  # counted on a fresh entry, or on the node's if no room
    assert pool.snapshot(PROVIDER, T0 + 0.6)["requests"] == 1


def test_restoring_a_node_by_hand_restores_its_models_and_one_model_can_be_ejected_alone():
    picker, pool, _ = setup(HOSTED)
    a, b = pool.health_entry(PROVIDER, "model-a", T0), pool.health_entry(PROVIDER, "model-b", T0)
    pool.eject(a, T0 + 0.1)
    assert not pool.is_available(a, T0 + 0.2) and pool.is_available(b, T0 + 0.2) and pool.is_available(PROVIDER, T0)
    pool.eject(PROVIDER, T0 + 0.3)
    pool.restore(PROVIDER, T0 + 0.4)
    assert pool.is_available(PROVIDER, T0 + 0.5) and pool.is_available(a, T0 + 0.5)


def test_a_model_entry_returns_on_its_timer_even_with_probing_on():
    _, pool, events = setup(HOSTED, probe=True)
    a = pool.health_entry(PROVIDER, "model-a", T0)
    pool.record(a, Outcome.RATE_LIMITED, None, T0 + 0.1, True)
    pool.advance(T0 + 1.01)
    assert not pool.is_available(a, T0 + 1.01)
    pool.advance(T0 + 31.1)  # no probe ever: a probe of the node says nothing about one model
    assert pool.is_available(a, T0 + 31.1)
    assert [e.action for e in events if e.model == "model-a"] == ["eject", "uneject"]
    assert not pool[PROVIDER].half_open  # the node never left


def test_status_shows_each_model_entry_under_its_node():
    class Events:
        failovers = 0
        recent: list = []

    _, pool, _ = setup(SELF_HOSTED, HOSTED)
    a = pool.health_entry(PROVIDER, "model-a", T0)
    pool.record(a, Outcome.RATE_LIMITED, None, T0 + 0.1, True)
    pool.advance(T0 + 1.01)
    status = build_status(pool, Events(), T0 + 1.5)
    hosted = status["upstreams"][1]["nodes"][0]
    assert hosted["state"] == "healthy" and hosted["models"]["model-a"]["state"] == "ejected"
    assert hosted["models"]["model-a"]["k"] == 1 and hosted["models"]["model-a"]["failure_rate"] == 100.0
    assert "models" not in status["upstreams"][0]["nodes"][0]
    assert any("#model-a" in line and "ejected" in line for line in status_table(status).splitlines())


def test_the_profile_key_health_scope(tmp_path):
    def load(extra: str):
        path = tmp_path / "p.yaml"
        path.write_text(textwrap.dedent(f"""
            upstreams:
              - name: primary
                nodes: ["http://127.0.0.1:1"]
              - name: hosted
                nodes: ["https://api.example.com"]
                {extra}
            """))
        return load_profile(path, env={})

    assert [u.health_scope for u in load("").upstreams] == ["node", "node"]
    assert load("health_scope: model").upstreams[1].health_scope == "model"
    with pytest.raises(ProfileError, match=r"upstreams\[1\]\.health_scope: needs one of node, model"):
        load("health_scope: models")


def status_with_model_entries() -> dict:
    """`/status` of a pool whose hosted node has model-a ejected and model-b healthy."""
    class Events:
        failovers = 0
        recent: list = []

    _, pool, _ = setup(SELF_HOSTED, HOSTED)
    pool.record(pool.health_entry(PROVIDER, "model-a", T0), Outcome.RATE_LIMITED, None, T0 + 0.1, True)
    pool.record(pool.health_entry(PROVIDER, "model-b", T0), Outcome.OK, None, T0 + 0.2, True)
    return build_status(pool, Events(), T0 + 1.5)


def metrics_with_model_entries() -> str:
    """`/metrics` of that status."""
    status = status_with_model_entries()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(lambda: status))
    return generate_latest(registry).decode()


def test_metrics_have_a_series_per_model_entry_with_a_model_label():
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(metrics_with_model_entries()) for s in family.samples}
    node = (("node", PROVIDER.url), ("upstream", "hosted"))
    a, b = (("model", "model-a"), *node), (("model", "model-b"), *node)
    assert values[("llm_ha_node_ejected", node)] == 0 and values[("llm_ha_node_attempts_total", node)] == 2
    assert values[("llm_ha_node_ejected", a)] == 1 and values[("llm_ha_node_failure_ratio", a)] == 1.0
    assert values[("llm_ha_node_failures_total", a)] == 1 and values[("llm_ha_node_ejections_total", a)] == 1
    assert values[("llm_ha_node_ejected", b)] == 0 and values[("llm_ha_node_k", b)] == 1
    assert not any(dict(labels).get("model") for _, labels in values if ("upstream", "primary") in labels)


def test_promtool_finds_the_metrics_with_model_entries_clean():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    checked = subprocess.run(["promtool", "check", "metrics"], input=metrics_with_model_entries(), capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_the_panel_has_a_line_per_model_entry_under_its_node():
    console = Console(width=140, record=True)
    console.print(build_panel(status_with_model_entries()))
    lines = console.export_text().splitlines()
    hosted = next(i for i, line in enumerate(lines) if PROVIDER.url in line)
    assert "healthy" in lines[hosted]
    assert "#model-a" in lines[hosted + 1] and "ejected" in lines[hosted + 1] and "100%" in lines[hosted + 1]
    assert "#model-b" in lines[hosted + 2] and "healthy" in lines[hosted + 2]
