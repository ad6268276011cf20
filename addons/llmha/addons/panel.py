"""The panel addon: the live rich panel pinned at the bottom of mitmdump (`llm_ha_panel`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mitmproxy import ctx
from mitmproxy.tools.dump import DumpMaster

from .runtime import TICK_S, RuntimeLoader

logger = logging.getLogger("llm_ha")


class PanelAddon:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader
        self.panel = None  # a LivePanel while shown (rich is imported only then)
        self._snapshot: dict = {}
        self._refresher: asyncio.Task | None = None
        self._running = False

    def load(self, loader) -> None:
        loader.add_option("llm_ha_panel", bool, False, "llm-ha: show the live panel in mitmdump.")

    def configure(self, updated: set[str]) -> None:
        if self._running and updated & {"llm_ha_panel", "llm_ha_profile"}:
            self._update()

    def running(self) -> None:
        self._running = True
        self._update()

    def done(self) -> None:
        self._stop()

    def _update(self) -> None:
        if not (ctx.options.llm_ha_panel and self.loader.runtime is not None):
            self._stop()
            return
        self._take_snapshot()
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_forever())
        if self.panel:
            return
        if not isinstance(ctx.master, DumpMaster):
            logger.info("llm-ha: the panel runs in mitmdump; beside the console use `python -m llmha.panel` "
                        "with llm_ha_status set")
            return
        from ..panel import LivePanel

        panel = LivePanel(lambda: self._snapshot)
        if panel.start():
            self.panel = panel
        else:
            logger.info("llm-ha: llm_ha_panel is on but stdout is not a terminal: no panel")

    def _stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            self._refresher = None
        if self.panel:
            self.panel.stop()
            self.panel = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            with contextlib.suppress(Exception):  # the panel must never take the proxy down
                self._take_snapshot()

    def _take_snapshot(self) -> None:
        # The panel draws from its own thread: it reads this snapshot, taken on the event loop.
        self._snapshot = self.loader.status()
