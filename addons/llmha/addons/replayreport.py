"""The replay report addon: what-if evaluation of the flows mitmdump reads with -r (`llm_ha_replay_report`).

The evaluation (`llmha.replay`) is imported only once a report is asked for and a recorded flow comes,
not on every proxy's start-up path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import ctx, http

if TYPE_CHECKING:
    from ..replay import ReplayEvaluator


class ReplayReport:
    def __init__(self) -> None:
        self._evaluator: ReplayEvaluator | None = None

    def load(self, loader) -> None:
        loader.add_option("llm_ha_replay_report", str, "",
                          "llm-ha: evaluate the flows read with -r against llm_ha_profile and write this JSON "
                          "report (and a PNG timeline beside it); empty: off.")

    def response(self, flow: http.HTTPFlow) -> None:
        self._collect(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._collect(flow)

    def done(self) -> None:
        if ctx.options.llm_ha_replay_report:
            self._get().done()

    def _collect(self, flow: http.HTTPFlow) -> None:
        if not flow.live and ctx.options.llm_ha_replay_report:
            self._get().collect(flow)

    def _get(self) -> ReplayEvaluator:
        if self._evaluator is None:
            from ..replay import ReplayEvaluator
            self._evaluator = ReplayEvaluator()
        return self._evaluator
