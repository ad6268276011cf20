"""llm-ha: keep a self-hosted LLM service available under traffic spikes.

    mitmdump --mode reverse:http://127.0.0.1:8001 -s addons/llm_ha.py \
        --set llm_ha_profile=profiles/local-two-upstreams.yaml

The code lives in the `llmha` package beside this script (mitmproxy puts the script's folder on
sys.path); see README.md. One addon per concern, in the order mitmproxy calls them.
"""

from llmha.addons.commands import Commands
from llmha.addons.eventlog import EventLogAddon
from llmha.addons.flowgate import FlowGate
from llmha.addons.panel import PanelAddon
from llmha.addons.runtime import RuntimeLoader
from llmha.addons.statusserver import StatusAddon
from llmha.addons.streamview import StreamView
from llmha.replay import ReplayEvaluator

events = EventLogAddon()  # llm_ha_events: the JSON-lines event log
profile = RuntimeLoader(events.log)  # llm_ha_profile: the profile and the state it runs
addons = [
    events,
    profile,
    FlowGate(profile),  # the data path: gate, failover, hand-off of streams
    StatusAddon(profile),  # llm_ha_status: GET /status and /metrics
    PanelAddon(profile),  # llm_ha_panel: the live panel in mitmdump
    Commands(profile),  # llm_ha.status / eject / restore / reset
    StreamView(),  # the "LLM stream" content view
    ReplayEvaluator(),  # llm_ha_replay_report: what-if evaluation of recordings read with -r
]
