"""llm-ha's addons, in the order mitmproxy calls them: what every entry script loads.

The entry scripts (`addons/llm_ha.py` in the repository, `llmha/scripts/llm_ha.py` in the package,
whose path `llm-ha script-path` prints) call `make_addons()`; mitmproxy runs a script afresh on every
(re)load, so each load gets new addon objects.
"""

from __future__ import annotations

from llmha.addons.commands import Commands
from llmha.addons.eventlog import EventLogAddon
from llmha.addons.flowgate import FlowGate
from llmha.addons.gcfreeze import GcFreeze
from llmha.addons.panel import PanelAddon
from llmha.addons.replayreport import ReplayReport
from llmha.addons.runtime import RuntimeLoader
from llmha.addons.statusserver import StatusAddon
from llmha.addons.streamview import StreamView


def make_addons() -> list:
    """One addon per concern, in the order mitmproxy calls them."""
    events = EventLogAddon()  # llm_ha_events: the JSON-lines event log
    profile = RuntimeLoader(events.log)  # llm_ha_profile: the profile and the state it runs
    return [
        events,
        profile,
        FlowGate(profile),  # the data path: gate, failover, hand-off of streams
        StatusAddon(profile),  # llm_ha_status: GET /, /status and /metrics
        PanelAddon(profile),  # llm_ha_panel: the live panel in mitmdump
        Commands(profile),  # llm_ha.status / eject / restore / reset
        StreamView(),  # the "LLM stream" content view
        ReplayReport(),  # llm_ha_replay_report: what-if evaluation of recordings read with -r
        GcFreeze(),  # llm_ha_gc_freeze: start-up's objects out of full garbage collections
    ]
