"""Active probing of ejected nodes (the profile's `probe`): the requests, their results, their events."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..core.nodes import NodePool
from ..core.profile import ProbeSettings
from ..core.retry import Probe
from ..core.types import NodeId, status_outcome
from .upstream import UpstreamClient

logger = logging.getLogger("llm_ha")


class Events(Protocol):
    def add(self, event: dict) -> None: ...


class Prober:
    """Active probing of ejected nodes (`probe` in the profile); the detector decides what a result means.

    A probe is the profile's request (default `GET /v1/models`) with the upstream's own api_key, never
    a client's credentials; it passes on an answer other than 5xx or 429 within the probe's timeout.
    Counted in `/status` and `/metrics`; a `probe` event is logged when a node's result changes (its
    first probe, the first to pass, the first to fail again), not once a second per ejected node.
    """

    def __init__(self, pool: NodePool, client: UpstreamClient, settings: ProbeSettings, events: Events) -> None:
        self.pool, self.client, self.settings, self.events = pool, client, settings, events
        self._probes: dict[NodeId, Probe] = {}
        self._tasks: set[asyncio.Task] = set()

    def tick(self, now: float) -> None:
        if not self.settings.enabled:
            return
        for node in self.pool:
            if node.monitor.ejected_until is None:
                self._probes.pop(node.id, None)
                continue
            probe = self._probes.setdefault(node.id, Probe(next_at=now + min(self.settings.interval, 0.5)))
            if probe.due(now):
                probe.start()
                task = asyncio.create_task(self._probe(node.id, probe))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _probe(self, node: NodeId, probe: Probe) -> None:
        s = self.settings
        upstream = self.pool[node].upstream
        headers = [("accept-encoding", "identity")]
        if s.body is not None:
            headers.append(("content-type", "application/json"))
        if upstream.api_key:
            headers.append(("authorization", f"Bearer {upstream.api_key}"))
        status: int | None = None
        error = ""
        try:
            async with asyncio.timeout(s.timeout):
                response = await self.client.send(s.method, node.url + s.path, headers, (s.body or "").encode())
                try:
                    status = response.status_code
                    await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            error = "timeout"
        except OSError as e:  # connection refused or reset (ConnectFailed included)
            error = type(e).__name__
        except Exception as e:  # a failed probe, never a probe that stops probing
            logger.exception(f"llm-ha: probe of {node} failed")
            error = type(e).__name__
        # Judged as the gate judges a status: a 401 or 404 still shows a server that answers (a probe
        # carries no client credentials, and /v1/models may want them), a 5xx or 429 does not.
        passed = status is not None and not status_outcome(status).failed
        now = time.time()
        if probe.finish(passed, now, s.interval):
            self.events.add({"ts": now, "action": "probe", "upstream": node.upstream, "node": node.url,
                             "k": self.pool[node].monitor.k, "duration_s": None, "failure_rate": None,
                             "passed": passed, "status": status, "error": error or None})
        self.pool.probe_result(node, passed, now)
