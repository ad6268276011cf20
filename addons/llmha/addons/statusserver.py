"""The status addon: serves `GET /status` and `GET /metrics` on `llm_ha_status` (HOST:PORT)."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from ..core.status import is_loopback, parse_listen_address
from ..tasks import background
from .runtime import RuntimeLoader

logger = logging.getLogger("llm_ha")


class StatusAddon:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader
        self.server = None  # a StatusServer while serving (prometheus_client is imported only then)
        self._running = False

    def load(self, loader) -> None:
        loader.add_option("llm_ha_status", str, "",
                          "llm-ha: HOST:PORT to serve GET /status and GET /metrics; keep it on loopback.")

    def configure(self, updated: set[str]) -> None:
        if "llm_ha_status" not in updated:
            return
        if ctx.options.llm_ha_status:
            try:
                parse_listen_address(ctx.options.llm_ha_status)
            except ValueError as e:
                if self._running:
                    raise exceptions.OptionsError(f"llm-ha: {e}") from None
                # At start-up, an error logged makes mitmproxy exit with it (its ErrorCheck addon): one clear line.
                logger.error(f"llm-ha: {e}")
                return
        if self._running:
            background(self._restart())

    async def running(self) -> None:
        self._running = True
        await self._restart()

    def done(self) -> None:
        if self.server:
            background(self.server.stop())
            self.server = None

    async def _restart(self) -> None:
        if self.server:
            await self.server.stop()
            self.server = None
        try:
            host, port = parse_listen_address(ctx.options.llm_ha_status)
        except ValueError:
            return  # empty, or refused at start-up already
        from ..statusserver import StatusServer

        server = StatusServer(self.loader.status, host, port)
        try:
            await server.start()
        except OSError as e:
            logger.error(f"llm-ha: cannot serve status on {ctx.options.llm_ha_status}: {e.strerror or e}")
            return
        self.server = server
        logger.info(f"llm-ha: status at {server.url}/status and {server.url}/metrics")
        if not is_loopback(host):
            logger.warning(f"llm-ha: the status server on {ctx.options.llm_ha_status} has no authentication and "
                           "answers anyone who can reach it: bind it to 127.0.0.1, or put it behind something "
                           "that authenticates")
