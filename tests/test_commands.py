"""Console commands and live option changes, driven through mitmproxy's own addon test harness."""

import json
import logging
import re

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from llmha.addons.commands import Commands
from llmha.addons.eventlog import EventLogAddon
from llmha.addons.runtime import RuntimeLoader
from llmha.addons.statusserver import StatusAddon
from llmha.core.types import Outcome

PROFILE = """
health_check: {interval: 1s, base_ejection_time: 30s}
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:9", "http://127.0.0.1:10"]
  - name: fallback
    nodes: ["http://127.0.0.1:11"]
"""


class Addons:
    """The addons the commands need, as the entry script lists them."""

    def __init__(self) -> None:
        self.events = EventLogAddon()
        self.loader = RuntimeLoader(self.events.log)
        self.commands = Commands(self.loader)
        self.status_addon = StatusAddon(self.loader)
        self.all = [self.events, self.loader, self.commands, self.status_addon]

    def status(self) -> dict:
        return self.loader.status()

    def __getattr__(self, name):  # the commands: eject_command, ...
        return getattr(self.commands, name)


@pytest.fixture
def loaded(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE)
    addon = Addons()
    with taddons.context(*addon.all) as tctx:
        tctx.configure(addon.events, llm_ha_events=str(tmp_path / "events.jsonl"))
        tctx.configure(addon.loader, llm_ha_profile=str(path))
        yield addon, tctx, tmp_path


def states(addon) -> dict:
    return {n["url"]: (n["state"], n["k"]) for u in addon.status()["upstreams"] for n in u["nodes"]}


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_eject_restore_reset_and_status(loaded, caplog):
    addon, tctx, tmp_path = loaded
    said = tctx.command(addon.eject_command, "http://127.0.0.1:9")
    assert states(addon)["http://127.0.0.1:9"] == ("ejected", 1)
    assert said.splitlines() == ["primary http://127.0.0.1:9: ejected by hand, as if it had failed (k grows)",
                                 "  primary http://127.0.0.1:9: ejected for 30s more, k=1"]
    assert "ejected primary http://127.0.0.1:9 for 30s (k=1, by hand)" in caplog.text

    said = tctx.command(addon.restore_command, "http://127.0.0.1:9")
    assert states(addon)["http://127.0.0.1:9"] == ("healthy", 2)
    assert said.endswith("primary http://127.0.0.1:9: healthy, k=2")
    assert "primary http://127.0.0.1:9 restored by hand, its k=1 ejection cut short" in caplog.text

    tctx.command(addon.eject_command, "primary")  # an upstream name ejects all its nodes
    assert [states(addon)[u][0] for u in ("http://127.0.0.1:9", "http://127.0.0.1:10")] == ["ejected"] * 2

    table = tctx.command(addon.status_command)  # the table is the command's result
    assert table.splitlines()[0].split()[:4] == ["upstream", "node", "state", "k"]
    assert [row.split()[:4] for row in table.splitlines()[1:]] == [
        ["primary", "http://127.0.0.1:9", "ejected", "2"], ["primary", "http://127.0.0.1:10", "ejected", "1"],
        ["fallback", "http://127.0.0.1:11", "healthy", "1"]]

    said = tctx.command(addon.reset_command)
    assert set(states(addon).values()) == {("healthy", 1)}
    assert said.startswith("primary http://127.0.0.1:9, primary http://127.0.0.1:10, fallback http://127.0.0.1:11: reset")
    assert [(e["action"], e["node"][-2:], e.get("by")) for e in events(tmp_path)] == [
        ("eject", ":9", "hand"), ("uneject", ":9", "hand"), ("eject", ":9", "hand"), ("eject", "10", "hand"),
        ("reset", ":9", "hand"), ("reset", "10", "hand"), ("reset", "11", "hand")]
    assert [e["action"] for e in addon.status()["events"]][-3:] == ["reset"] * 3, "the panel's recent events"


def test_eject_with_a_duration_drains_without_raising_k(loaded):
    addon, tctx, tmp_path = loaded
    said = tctx.command(addon.eject_command, "http://127.0.0.1:10", "10m")
    node = next(n for n in addon.status()["upstreams"][0]["nodes"] if n["url"] == "http://127.0.0.1:10")
    assert (node["state"], node["k"], node["ejections"]) == ("ejected", 1, 1)
    assert 595 < node["ejected_remaining_s"] <= 600
    assert said.splitlines()[0] == "primary http://127.0.0.1:10: drained by hand for 10m, k unchanged"
    tctx.command(addon.restore_command, "http://127.0.0.1:10")
    assert states(addon)["http://127.0.0.1:10"] == ("healthy", 1), "a drain leaves k as it was"
    drain = events(tmp_path)[0]
    assert (drain["action"], drain["duration_s"], drain["failure_rate"], drain["by"]) == ("eject", 600, None, "hand")

    with pytest.raises(exceptions.CommandError, match=r"DURATION: expected e.g. 90s, 10m or 1h, got 'soon'"):
        tctx.command(addon.eject_command, "primary", "soon")


def test_the_commands_have_names_mitmweb_accepts_and_the_old_names_as_aliases(loaded):
    addon, tctx, _ = loaded
    commands = tctx.master.commands
    for name in ("status", "eject", "restore", "reset"):
        assert re.fullmatch(r"[a-z.]+", f"llmha.{name}"), "mitmweb's route: /commands/(?P<cmd>[a-z.]+)"
        assert f"llmha.{name}" in commands.commands and f"llm_ha.{name}" in commands.commands
    assert commands.execute("llm_ha.eject http://127.0.0.1:11 90s").startswith("fallback http://127.0.0.1:11: drained")
    assert "fallback" in commands.execute("llmha.status")


def test_while_ejected_the_status_shows_the_failure_rate_that_caused_it(loaded):
    addon, _, _ = loaded
    pool = addon.loader.runtime.pool
    node = next(iter(pool.nodes))
    start = pool.detector.started
    for outcome in (Outcome.HTTP_ERROR, Outcome.HTTP_ERROR, Outcome.OK, Outcome.HTTP_ERROR):
        pool.detector.record(node, outcome, start + 0.5)
    later = start + 5.5  # four empty intervals after the ejecting one
    snapshot = pool.snapshot(node, later)
    assert (snapshot["state"], snapshot["failure_rate"]) == ("ejected", 75.0)
    assert pool[node].monitor.last_failure_rate == 0.0
    pool.restore(node, later)
    assert pool.snapshot(node, later)["failure_rate"] == 0.0, "back in rotation: the last interval's rate"


def test_a_profile_reload_says_what_changed_and_keeps_the_event_history(loaded, caplog):
    addon, tctx, tmp_path = loaded
    tctx.command(addon.eject_command, "http://127.0.0.1:9")
    changed = tmp_path / "changed.yaml"
    changed.write_text(PROFILE.replace("health_check: {", "first_byte_timeout: 1s\nhealth_check: {failure_rate_threshold: 30, ")
                       .replace('nodes: ["http://127.0.0.1:11"]', 'nodes: ["http://127.0.0.1:11"]\n    model: m2'))
    with caplog.at_level(logging.WARNING, logger="llm_ha"):
        tctx.configure(addon.loader, llm_ha_profile=str(changed))
    reload = next(r for r in caplog.records if "profile reloaded" in r.getMessage())
    assert reload.levelno == logging.WARNING
    assert reload.getMessage() == (
        f"llm-ha: profile reloaded: path {tmp_path / 'p.yaml'} -> {changed}, "
        "health_check.failure_rate_threshold 50% -> 30%, first_byte_timeout 200ms -> 1s, "
        "fallback.model unset -> m2; node health starts afresh")
    assert [e["action"] for e in addon.status()["events"]] == ["eject"], "the event history survives the reload"


def test_a_reload_names_secrets_that_changed_without_showing_them(tmp_path):
    from llmha.addons.runtime import profile_changes
    from llmha.core.profile import parse_profile

    def profile(key: str):
        return parse_profile({"upstreams": [{"name": "a", "nodes": ["http://x"], "api_key": key}]}, "p.yaml", {}, None)

    assert profile_changes(profile("sk-old-secret"), profile("sk-new-secret")) == ["api_key changed"]


def test_unknown_node_is_a_clear_command_error(loaded):
    addon, tctx, _ = loaded
    with pytest.raises(exceptions.CommandError, match="no node 'nope'"):
        addon.eject_command("nope")


def test_commands_without_a_profile_say_so():
    addon = Addons()
    with taddons.context(*addon.all):
        with pytest.raises(exceptions.CommandError, match="no profile loaded"):
            addon.status_command()


def test_a_bad_profile_set_while_running_is_refused_and_the_old_one_kept(loaded):
    addon, tctx, tmp_path = loaded
    addon.loader._running = True
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: []\n")
    before = addon.loader.runtime
    before.pool.eject(next(iter(before.pool.nodes)), 0)
    with pytest.raises(exceptions.OptionsError, match=r"bad.yaml: upstreams: needs a list"):
        tctx.configure(addon.loader, llm_ha_profile=str(bad))
    assert addon.loader.runtime is before, "the rollback keeps the running state (and its ejections)"


def test_bad_status_address_is_refused(loaded, caplog):
    addon, tctx, _ = loaded
    tctx.configure(addon.status_addon, llm_ha_status="nonsense")  # at start-up: one line, mitmproxy then exits
    assert "llm-ha: llm_ha_status: needs HOST:PORT, e.g. 127.0.0.1:9091, got 'nonsense'" in caplog.text
    addon.status_addon._running = True  # set live: refused, the running value stays
    with pytest.raises(exceptions.OptionsError, match="HOST:PORT"):
        tctx.configure(addon.status_addon, llm_ha_status="nonsense again")


def test_one_model_s_entry_on_a_node_is_named_node_hash_model(tmp_path):
    """`health_scope: model`: `llmha.eject NODE#MODEL` takes one model out on the node; restoring the node
    ends its models' ejections too."""
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.replace('nodes: ["http://127.0.0.1:11"]', 'nodes: ["http://127.0.0.1:11"]\n'
                                                                          '    health_scope: model'))
    addon = Addons()
    with taddons.context(*addon.all) as tctx:
        tctx.configure(addon.loader, llm_ha_profile=str(path))
        runtime = addon.loader.runtime
        hosted = next(n for n in runtime.pool.nodes if n.upstream == "fallback")
        runtime.candidates(model="model-a")  # a request for model-a made its entry
        said = tctx.master.commands.execute('llmha.eject "fallback#model-a"')
        assert said.splitlines() == ["fallback http://127.0.0.1:11#model-a: ejected by hand, as if it had failed (k grows)",
                                     "  fallback http://127.0.0.1:11#model-a: ejected for 30s more, k=1"]
        node = addon.status()["upstreams"][1]["nodes"][0]
        assert node["state"] == "healthy" and node["models"]["model-a"]["state"] == "ejected"
        assert [c.upstream.name for c in runtime.candidates(model="model-a")] == ["primary", "primary"]
        assert [c.upstream.name for c in runtime.candidates(model="model-b")][-1] == "fallback"
        tctx.command(addon.restore_command, "http://127.0.0.1:11")
        assert runtime.pool.snapshot(hosted, runtime.pool.detector.started)["models"]["model-a"]["state"] == "healthy"
        with pytest.raises(exceptions.CommandError, match="no node 'fallback#model-z'"):
            tctx.command(addon.eject_command, "fallback#model-z")
