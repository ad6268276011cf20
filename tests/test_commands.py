"""Console commands and live option changes, driven through mitmproxy's own addon test harness."""


import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from llmha.addons.commands import Commands
from llmha.addons.eventlog import EventLogAddon
from llmha.addons.runtime import RuntimeLoader
from llmha.addons.statusserver import StatusAddon

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


def test_bad_status_address_is_refused(loaded):
    addon, tctx, _ = loaded
    with pytest.raises(exceptions.OptionsError, match="HOST:PORT"):
        tctx.configure(addon.status_addon, llm_ha_status="nonsense")
