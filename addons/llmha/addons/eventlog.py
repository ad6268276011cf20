"""The event log addon: ejections, returns, failovers, for `/status`, the panel and a JSON-lines file."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

from mitmproxy import ctx

RECENT_EVENTS = 20


class EventLog:
    """Recent events for the status and panel, and optionally a JSON-lines file."""

    def __init__(self, path: str = "") -> None:
        self.recent: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.failovers = 0
        self._file = None
        self.open(path)

    def open(self, path: str) -> None:
        """Write from now on to `path` (appending); empty: to no file."""
        self.close()
        if path:
            self._file = Path(path).open("a", encoding="utf-8", buffering=1)

    def add(self, event: dict) -> None:
        self.recent.append(event)
        if event["action"] == "failover":
            self.failovers += 1
        if self._file:
            self._file.write(json.dumps(event) + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class EventLogAddon:
    """Owns the event log; `llm_ha_events` names its file."""

    def __init__(self) -> None:
        self.log = EventLog()

    def load(self, loader) -> None:
        loader.add_option("llm_ha_events", str, "", "llm-ha: path of a JSON-lines event log.")

    def configure(self, updated: set[str]) -> None:
        if "llm_ha_events" in updated:
            self.log.open(os.path.expanduser(ctx.options.llm_ha_events))

    def done(self) -> None:
        self.log.close()
