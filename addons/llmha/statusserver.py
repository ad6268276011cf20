"""The status server: `GET /` (the HTML dashboard), `GET /status` (JSON) and `GET /metrics` (Prometheus text).

Metrics are computed at scrape time from the status document, so the data path pays nothing for them.
The server binds to the address it is given only: keep it on loopback, it has no authentication.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .proxy.httpserver import HttpServer, Request, Responder

logger = logging.getLogger(__name__)


class _StatusCollector:
    """Prometheus metrics made from the status document at scrape time.

    Names follow Prometheus' conventions: base units in the name (seconds, ratio 0..1), `_total` on
    counters (prometheus_client appends it). The profile's settings are exported too, so that alert
    rules and dashboards compare against the running profile instead of copying its numbers.
    """

    def __init__(self, get_status: Callable[[], dict]) -> None:
        self.get_status = get_status

    def collect(self):
        status = self.get_status()
        yield _info(status)
        yield from _profile_settings(status)
        yield from _upstream_metrics(status)
        yield from _node_metrics(status)
        failovers = CounterMetricFamily("llm_ha_failovers", "Attempts that failed and passed the request on")
        failovers.add_metric([], status.get("failovers", 0))
        yield failovers
        lag = GaugeMetricFamily("llm_ha_event_loop_lag_seconds",
                                "Worst lateness of mitmproxy's event loop over the last health ticks")
        lag.add_metric([], status.get("proxy", {}).get("loop_lag_ms", 0.0) / 1000)
        yield lag
        shared = status.get("shared_state")
        if shared:
            degraded = GaugeMetricFamily("llm_ha_shared_state_degraded",
                                         "1 while the shared state store cannot be reached (each instance on its own)")
            degraded.add_metric([], int(shared.get("state") != "connected"))
            yield degraded


# The `instance` label is Prometheus' own (the scraped target): ours would be renamed `exported_instance`.
INFO_LABELS = ["instance_id", "profile", "version"]
NODE_LABELS = ["upstream", "node"]
UPSTREAM_LABELS = ["upstream", "role"]

NODE_GAUGES: dict[str, tuple[str, Callable[[dict], float | None]]] = {
    "llm_ha_node_ejected": ("1 while the node is ejected", lambda n: int(n["state"] == "ejected")),
    "llm_ha_node_k": ("Ejection multiplier k (the current ejection's while ejected, else the next one's)",
                      lambda n: n["k"]),
    "llm_ha_node_ejection_remaining_seconds": ("Seconds left in the current ejection",
                                               lambda n: n["ejected_remaining_s"]),
    "llm_ha_node_failure_ratio": ("Failed / finished attempts over the last full health-check interval (0..1)",
                                  lambda n: n["failure_rate"] / 100),
    "llm_ha_node_inflight": ("Attempts in flight", lambda n: n["inflight"]),
    "llm_ha_node_not_before_seconds": ("Seconds until the node may be tried again, as its Retry-After asked",
                                       lambda n: n.get("not_before_s")),
    "llm_ha_node_inflight_limit": ("Attempts the node may have in flight now (absent: unlimited)",
                                   lambda n: n.get("limit")),
    "llm_ha_node_cluster_inflight": ("With shared state: attempts in flight on the node across every instance",
                                     lambda n: (n.get("cluster") or {}).get("inflight")),
    "llm_ha_node_cluster_failure_ratio": ("With shared state: the last judged interval's failure ratio across every "
                                          "instance (0..1)",
                                          lambda n: None if not n.get("cluster") else n["cluster"]["failure_rate"] / 100),
    "llm_ha_node_ttfb_p50_seconds": ("Median time to first byte over the last minute",
                                     lambda n: _seconds(n["ttfb_p50_ms"])),
    "llm_ha_node_ttfb_p95_seconds": ("95th percentile time to first byte over the last minute",
                                     lambda n: _seconds(n["ttfb_p95_ms"])),
}
# The health metrics a model's entry on a node also has (`health_scope: model`), with a `model` label.
MODEL_GAUGES = ("llm_ha_node_ejected", "llm_ha_node_k", "llm_ha_node_ejection_remaining_seconds",
                "llm_ha_node_failure_ratio")
MODEL_COUNTERS = ("llm_ha_node_attempts", "llm_ha_node_failures", "llm_ha_node_ejections")
NODE_COUNTERS = {  # metric (exposed with `_total`) -> (help, status key)
    "llm_ha_node_attempts": ("Finished upstream attempts", "requests"),
    "llm_ha_node_failures": ("Failed upstream attempts", "failures"),
    "llm_ha_node_ejections": ("Ejections so far", "ejections"),
    "llm_ha_node_shed": ("Requests sent elsewhere because the node was at its concurrency limit", "shed"),
    "llm_ha_node_stream_breaks": ("Streams that broke after their first token (cut, stalled, in-band error, "
                                  "no end)", "breaks"),
    "llm_ha_node_stream_stalls": ("Streams silent for stream_idle_timeout after their first token", "stalls"),
    "llm_ha_node_resumes": ("Answers broken on another node that this node continued", "resumes"),
    "llm_ha_node_probes": ("Active probes of the node while it was ejected", "probes"),
    "llm_ha_node_probe_failures": ("Active probes of the node that failed", "probe_failures"),
}


def _info(status: dict) -> GaugeMetricFamily:
    info = GaugeMetricFamily("llm_ha_info", "Always 1; labels: this instance, its profile and llm-ha's version",
                             labels=INFO_LABELS)
    profile = status.get("profile") or {}
    info.add_metric([str(status.get("instance") or ""), str(profile.get("name") or ""), _version()], 1)
    return info


def _profile_settings(status: dict) -> Iterator[GaugeMetricFamily]:
    profile = status.get("profile")
    if not profile:
        return
    threshold = GaugeMetricFamily("llm_ha_failure_ratio_threshold",
                                  "The profile's failure_rate_threshold (0..1): at or above it a node is ejected")
    threshold.add_metric([], profile["failure_rate_threshold"] / 100)
    base = GaugeMetricFamily("llm_ha_base_ejection_time_seconds", "The profile's base_ejection_time")
    base.add_metric([], profile["base_ejection_time_s"])
    timeout = GaugeMetricFamily("llm_ha_upstream_first_byte_timeout_seconds",
                                "The upstream's first_byte_timeout", labels=["upstream"])
    for upstream in status["upstreams"]:
        timeout.add_metric([upstream["name"]], upstream.get("first_byte_timeout_ms", 0) / 1000)
    yield from (threshold, base, timeout)


def _upstream_metrics(status: dict) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    nodes = GaugeMetricFamily("llm_ha_upstream_nodes", "Nodes of the upstream (role: primary or fallback)",
                              labels=UPSTREAM_LABELS)
    available = GaugeMetricFamily("llm_ha_upstream_nodes_available", "Nodes of the upstream not ejected",
                                  labels=UPSTREAM_LABELS)
    retries = CounterMetricFamily("llm_ha_upstream_retries", "Attempts on the upstream past a request's first one",
                                  labels=UPSTREAM_LABELS)
    denied = CounterMetricFamily("llm_ha_upstream_retries_denied",
                                 "Retries the upstream's retry budget refused (the request moved on)",
                                 labels=UPSTREAM_LABELS)
    for index, upstream in enumerate(status["upstreams"]):
        labels = [upstream["name"], "primary" if index == 0 else "fallback"]
        nodes.add_metric(labels, len(upstream["nodes"]))
        available.add_metric(labels, sum(n["state"] != "ejected" for n in upstream["nodes"]))
        budget = upstream.get("retry_budget") or {}
        retries.add_metric(labels, budget.get("retries", 0))
        denied.add_metric(labels, budget.get("retries_denied", 0))
    yield from (nodes, available, retries, denied)


def _node_metrics(status: dict) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    gauges = {name: GaugeMetricFamily(name, text, labels=NODE_LABELS) for name, (text, _) in NODE_GAUGES.items()}
    counters = {name: CounterMetricFamily(name, text, labels=NODE_LABELS) for name, (text, _) in NODE_COUNTERS.items()}
    for upstream in status["upstreams"]:
        for node in upstream["nodes"]:
            labels = [upstream["name"], node["url"]]
            for name, (_, value_of) in NODE_GAUGES.items():
                value = value_of(node)
                if value is not None:
                    gauges[name].add_metric(labels, value)
            for name, (_, key) in NODE_COUNTERS.items():
                counters[name].add_metric(labels, node.get(key) or 0)
            for model, entry in (node.get("models") or {}).items():
                _add_model_samples(gauges, counters, {"upstream": upstream["name"], "node": node["url"], "model": model},
                                   entry)
    yield from gauges.values()
    yield from counters.values()


def _add_model_samples(gauges: dict[str, GaugeMetricFamily], counters: dict[str, CounterMetricFamily],
                       labels: dict[str, str], entry: dict) -> None:
    """One model's entry on a node: the node's health metrics, with the `model` label added."""
    for name in MODEL_GAUGES:
        gauges[name].add_sample(name, labels, NODE_GAUGES[name][1](entry))
    for name in MODEL_COUNTERS:
        counters[name].add_sample(name + "_total", labels, entry.get(NODE_COUNTERS[name][1]) or 0)


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("llm-ha")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


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
        elif request.path == "/":
            await responder.respond(200, _dashboard(), DASHBOARD_HEADERS)
        elif request.path == "/status":
            body = json.dumps(self.get_status(), indent=1).encode()
            await responder.respond(200, body, [("content-type", "application/json")])
        elif request.path == "/metrics":
            await responder.respond(200, generate_latest(self.registry),
                                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")])
        else:
            await responder.respond(404, b"try /, /status or /metrics\n", [("content-type", "text/plain")])


# The page loads nothing but itself and /status: the policy makes the browser enforce it.
DASHBOARD_HEADERS = [
    ("content-type", "text/html; charset=utf-8"),
    ("content-security-policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'"),
    ("cache-control", "no-cache"),
]


@functools.cache
def _dashboard() -> bytes:
    """The dashboard page, shipped as package data beside this module."""
    return importlib.resources.files(__package__).joinpath("dashboard.html").read_bytes()
