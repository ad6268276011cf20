"""Operator commands: `llm_ha.status`, `llm_ha.eject`, `llm_ha.restore`, `llm_ha.reset`."""

from __future__ import annotations

import logging
import time

from mitmproxy import command

from ..core.status import status_table
from .runtime import RuntimeLoader

logger = logging.getLogger("llm_ha")


class Commands:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader

    @command.command("llm_ha.status")
    def status_command(self) -> None:
        """Print each node's state, k and counters to the event log."""
        logger.warning("llm-ha status:\n" + status_table(self.loader.need_runtime().status()))

    @command.command("llm_ha.eject")
    def eject_command(self, node: str) -> None:
        """Eject a node by hand (URL, upstream name, or 'upstream URL'), as if it had failed."""
        runtime = self.loader.need_runtime()
        for n in runtime.find_nodes(node):
            runtime.pool.eject(n, time.time())

    @command.command("llm_ha.restore")
    def restore_command(self, node: str) -> None:
        """End a node's ejection now."""
        runtime = self.loader.need_runtime()
        for n in runtime.find_nodes(node):
            runtime.pool.restore(n, time.time())

    @command.command("llm_ha.reset")
    def reset_command(self) -> None:
        """Put every node back in rotation with k = 1 and clear the counters."""
        self.loader.need_runtime().pool.reset(time.time())
        logger.warning("llm-ha: health state reset")
