"""The status server: `GET /status` (JSON) and `GET /metrics` (Prometheus text) from the status document.

Metrics are computed at scrape time from the status document, so the data path pays nothing for them.
The server binds to the address it is given only: keep it on loopback, it has no authentication.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .proxy.httpserver import HttpServer, Request, Responder

logger = logging.getLogger(__name__)


class _StatusCollector:
    """Prometheus metrics made from the status document at scrape time."""

    def __init__(self, get_status: Callable[[], dict]) -> None:
        self.get_status = get_status

    def collect(self):
        status = self.get_status()
        labels = ["upstream", "node"]
        gauges = {
            "ejected": GaugeMetricFamily("llm_ha_node_ejected", "1 while the node is ejected", labels=labels),
            "k": GaugeMetricFamily("llm_ha_node_k", "Ejection multiplier k (current while ejected, else next)", labels=labels),
            "ejected_remaining_s": GaugeMetricFamily("llm_ha_node_ejection_remaining_seconds", "Seconds left in the current ejection", labels=labels),
            "failure_rate": GaugeMetricFamily("llm_ha_node_failure_rate_percent", "Failure rate over the last full interval", labels=labels),
            "inflight": GaugeMetricFamily("llm_ha_node_inflight", "Attempts in flight", labels=labels),
            "ttfb_p50_ms": GaugeMetricFamily("llm_ha_node_ttfb_p50_seconds", "Median time to first byte, last minute", labels=labels),
            "ttfb_p95_ms": GaugeMetricFamily("llm_ha_node_ttfb_p95_seconds", "95th percentile time to first byte, last minute", labels=labels),
        }
        counters = {
            "requests": CounterMetricFamily("llm_ha_node_attempts", "Finished upstream attempts", labels=labels),
            "failures": CounterMetricFamily("llm_ha_node_failures", "Failed upstream attempts", labels=labels),
            "ejections": CounterMetricFamily("llm_ha_node_ejections", "Ejections so far", labels=labels),
            "shed": CounterMetricFamily("llm_ha_node_shed", "Requests sent elsewhere because the node was at its limit", labels=labels),
        }
        for upstream in status["upstreams"]:
            for node in upstream["nodes"]:
                values = [upstream["name"], node["url"]]
                for key, family in gauges.items():
                    value = int(node["state"] == "ejected") if key == "ejected" else node[key]
                    if key.endswith("_ms"):
                        value = None if value is None else value / 1000
                    if value is not None:
                        family.add_metric(values, value)
                for key, family in counters.items():
                    family.add_metric(values, node.get(key) or 0)
        failovers = CounterMetricFamily("llm_ha_failovers", "Attempts that failed and passed the request on")
        failovers.add_metric([], status["failovers"])
        lag = GaugeMetricFamily("llm_ha_event_loop_lag_seconds",
                                "Worst lateness of mitmproxy's event loop over the last health ticks")
        lag.add_metric([], status.get("proxy", {}).get("loop_lag_ms", 0.0) / 1000)
        yield lag
        yield from gauges.values()
        yield from counters.values()
        yield failovers


class StatusServer:
    def __init__(self, get_status: Callable[[], dict], host: str, port: int) -> None:
        self.get_status = get_status
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatusCollector(get_status))
        self._server = HttpServer(self._serve, host, port)

    @property
    def url(self) -> str:
        return self._server.url

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def _serve(self, request: Request, responder: Responder) -> None:
        if request.method != "GET":
            await responder.respond(405, b"method not allowed\n", [("allow", "GET")])
        elif request.path == "/status":
            body = json.dumps(self.get_status(), indent=1).encode()
            await responder.respond(200, body, [("content-type", "application/json")])
        elif request.path == "/metrics":
            await responder.respond(200, generate_latest(self.registry),
                                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")])
        else:
            await responder.respond(404, b"try /status or /metrics\n", [("content-type", "text/plain")])
