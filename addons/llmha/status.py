"""What llm-ha shows about itself: the status document, Prometheus metrics, the event log.

`build_status` is pure (state and time in, dict out); `StatusServer` serves it at `GET /status` and as
Prometheus text at `GET /metrics`, computed at scrape time so the data path pays nothing for it.
The server binds to the address it is given only: keep it on loopback, it has no authentication.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .health import HealthTracker, Node
from .httpserver import HttpServer, Request, Responder
from .profile import Profile

logger = logging.getLogger(__name__)

RECENT_EVENTS = 20


class EventLog:
    """Recent events for the status and panel, and optionally a JSON-lines file."""

    def __init__(self, path: str = "") -> None:
        self.recent: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.failovers = 0
        self._file = Path(path).open("a", encoding="utf-8", buffering=1) if path else None

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


def build_status(profile: Profile, tracker: HealthTracker, events: EventLog, now: float,
                 limits: Callable[[Node], dict] | None = None) -> dict:
    hc = profile.health_check
    return {
        "now": now,
        "profile": {
            "name": profile.name, "path": profile.path,
            "failure_rate_threshold": hc.failure_rate_threshold, "interval_s": hc.interval,
            "base_ejection_time_s": hc.base_ejection_time, "max_ejection_time_s": hc.max_ejection_time,
            "first_byte_timeout_ms": profile.first_byte_timeout * 1000, "min_requests": hc.min_requests,
            "k_decay_after_s": hc.k_decay_period, "transparent_failover": profile.transparent_failover,
        },
        "upstreams": [
            {"name": u.name, "first_byte_timeout_ms": u.first_byte_timeout * 1000, "model": u.model,
             "nodes": [_node_status(tracker, Node(u.name, url), now, limits) for url in u.nodes]}
            for u in profile.upstreams
        ],
        "failovers": events.failovers,
        "events": list(events.recent),
    }


def _node_status(tracker: HealthTracker, node: Node, now: float, limits) -> dict:
    status = tracker.snapshot(node, now)
    status.update(limits(node, now) if limits else {"limit": None, "shed": 0})
    return status


def status_table(status: dict) -> str:
    """A plain-text table of the status, for the event log (`llm_ha.status`)."""
    lines = [f"{'upstream':<12} {'node':<40} {'state':<8} {'k':>2} {'ejections':>9} {'left_s':>7} "
             f"{'fail%':>6} {'requests':>8} {'inflight':>8} {'p50ms':>7} {'p95ms':>7}"]
    for upstream in status["upstreams"]:
        for n in upstream["nodes"]:
            lines.append(
                f"{upstream['name']:<12} {n['url']:<40} {n['state']:<8} {n['k']:>2} {n['ejections']:>9} "
                f"{n['ejected_remaining_s']:>7.1f} {n['failure_rate']:>6.1f} {n['requests']:>8} {n['inflight']:>8} "
                f"{_ms(n['ttfb_p50_ms']):>7} {_ms(n['ttfb_p95_ms']):>7}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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


def parse_listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"llm_ha_status: needs HOST:PORT, e.g. 127.0.0.1:9091, got {value!r}")
    return host.strip("[]"), int(port)
