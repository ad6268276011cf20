"""Console commands and live option changes, driven through mitmproxy's own addon test harness."""


import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from llmha.addon import LlmHa

PROFILE = """
health_check: {interval: 1s, base_ejection_time: 30s}
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:9", "http://127.0.0.1:10"]
  - name: fallback
    nodes: ["http://127.0.0.1:11"]
"""


@pytest.fixture
def loaded(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE)
    addon = LlmHa()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llm_ha_profile=str(path), llm_ha_events=str(tmp_path / "events.jsonl"))
        yield addon, tctx, tmp_path


def states(addon) -> dict:
    return {n["url"]: (n["state"], n["k"]) for u in addon.status()["upstreams"] for n in u["nodes"]}


def test_eject_restore_reset_and_status(loaded, caplog):
    addon, tctx, tmp_path = loaded
    tctx.command(addon.eject_command, "http://127.0.0.1:9")
    assert states(addon)["http://127.0.0.1:9"] == ("ejected", 1)
    assert "ejected primary http://127.0.0.1:9 for 30s (k=1, by hand)" in caplog.text

    tctx.command(addon.restore_command, "http://127.0.0.1:9")
    assert states(addon)["http://127.0.0.1:9"] == ("healthy", 2)

    tctx.command(addon.eject_command, "primary")  # an upstream name ejects all its nodes
    assert [states(addon)[u][0] for u in ("http://127.0.0.1:9", "http://127.0.0.1:10")] == ["ejected"] * 2

    tctx.command(addon.status_command)
    assert "primary      http://127.0.0.1:9" in caplog.text

    tctx.command(addon.reset_command)
    assert set(states(addon).values()) == {("healthy", 1)}
    actions = [line.split('"action": "')[1].split('"')[0] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert actions == ["eject", "uneject", "eject", "eject"]


def test_unknown_node_is_a_clear_command_error(loaded):
    addon, tctx, _ = loaded
    with pytest.raises(exceptions.CommandError, match="no node 'nope'"):
        addon.eject_command("nope")


def test_commands_without_a_profile_say_so():
    addon = LlmHa()
    with taddons.context(addon):
        with pytest.raises(exceptions.CommandError, match="no profile loaded"):
            addon.status_command()


def test_a_bad_profile_set_while_running_is_refused_and_the_old_one_kept(loaded):
    addon, tctx, tmp_path = loaded
    addon._running = True
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: []\n")
    before = addon.runtime
    before.tracker.eject(before.tracker.nodes[0], 0)
    with pytest.raises(exceptions.OptionsError, match=r"bad.yaml: upstreams: needs a list"):
        tctx.configure(addon, llm_ha_profile=str(bad))
    assert addon.runtime is before, "the rollback keeps the running state (and its ejections)"


def test_bad_status_address_is_refused(loaded):
    addon, tctx, _ = loaded
    with pytest.raises(exceptions.OptionsError, match="HOST:PORT"):
        tctx.configure(addon, llm_ha_status="nonsense")
