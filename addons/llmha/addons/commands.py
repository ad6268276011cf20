"""Operator commands: `llmha.status`, `llmha.eject`, `llmha.restore`, `llmha.reset`.

mitmweb runs commands through `POST /commands/<name>`, a route that accepts only `[a-z.]+`: hence
`llmha.*`. The `llm_ha.*` names stay as aliases for the console and scripts. Every command returns
what it did (the console shows it in a pop-up, mitmweb in its command bar) and the state changes it
makes are events, in the event log and the panel.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import command, ctx, exceptions

from ..core.profile import parse_duration
from ..core.status import status_table
from ..core.types import NodeId
from .runtime import Runtime, RuntimeLoader

logger = logging.getLogger("llm_ha")

ALIAS_PREFIX = "llm_ha."


class Commands:
    def __init__(self, loader: RuntimeLoader) -> None:
        self.loader = loader

    def load(self, loader) -> None:
        for method in (self.status_command, self.eject_command, self.restore_command, self.reset_command):
            ctx.master.commands.add(ALIAS_PREFIX + method.command_name.split(".", 1)[1], method)

    @command.command("llmha.status")
    def status_command(self) -> str:
        """Each node's state, k and counters, as a table."""
        table = status_table(self.loader.need_runtime().status())
        logger.info("llm-ha status:\n" + table)
        return table

    @command.command("llmha.eject")
    def eject_command(self, node: str, duration: str = "") -> str:
        """Take NODE (a URL, an upstream name, or 'upstream URL'; one model on it: NODE#MODEL) out of rotation.
        Without DURATION as if it had failed (k grows); with one (90s, 10m, 1h) for that long, k as it is."""
        runtime = self.loader.need_runtime()
        nodes = runtime.find_nodes(node)
        now = time.time()
        if duration:
            seconds = _parse_duration(duration)
            for n in nodes:
                runtime.pool.drain(n, now, seconds)
            done = f"drained by hand for {duration}, k unchanged"
        else:
            for n in nodes:
                runtime.pool.eject(n, now)
            done = "ejected by hand, as if it had failed (k grows)"
        return _report(runtime, nodes, now, done)

    @command.command("llmha.restore")
    def restore_command(self, node: str) -> str:
        """End the ejection of NODE (a URL, an upstream name, or 'upstream URL'; with its models' entries;
        one model's alone: NODE#MODEL) now; k stays as it is."""
        runtime = self.loader.need_runtime()
        nodes = runtime.find_nodes(node)
        now = time.time()
        for n in nodes:
            runtime.pool.restore(n, now)
        return _report(runtime, nodes, now, "restored by hand")

    @command.command("llmha.reset")
    def reset_command(self) -> str:
        """Put every node back in rotation with k = 1 and clear the counters."""
        runtime = self.loader.need_runtime()
        now = time.time()
        runtime.pool.reset(now)
        return _report(runtime, list(runtime.pool.nodes), now, "reset by hand: in rotation, k = 1, counters cleared")


def _parse_duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise exceptions.CommandError(f"llm-ha: DURATION: expected e.g. 90s, 10m or 1h, got {text!r}") from None


def _report(runtime: Runtime, nodes: list[NodeId], now: float, done: str) -> str:
    """`primary http://127.0.0.1:8001: ejected by hand ...` then each node's state now."""
    lines = [f"{', '.join(map(str, nodes))}: {done}"]
    for node in nodes:
        snapshot = runtime.pool.snapshot(node.node, now)
        if node.model:  # a model's entry on the node (`health_scope: model`)
            snapshot = snapshot["models"][node.model]
        left = f" for {snapshot['ejected_remaining_s']:.0f}s more" if snapshot["state"] == "ejected" else ""
        lines.append(f"  {node}: {snapshot['state']}{left}, k={snapshot['k']}")
    return "\n".join(lines)
