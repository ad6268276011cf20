"""What llm-ha shows about itself: the status document (`GET /status`, the panel, `llm_ha.status`).

Pure: state and time in, dict or text out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

from .nodes import NodePool
from .types import NodeId


class RecentEvents(Protocol):
    failovers: int
    recent: Sequence[dict]


def build_status(pool: NodePool, events: RecentEvents, now: float) -> dict:
    """The status document (see README) of one pool at `now`."""
    profile = pool.profile
    hc = profile.health_check
    pool.advance(now)
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
             "nodes": [pool.snapshot(NodeId(u.name, url), now) for url in u.nodes]}
            for u in profile.upstreams
        ],
        "failovers": events.failovers,
        "events": list(events.recent),
    }


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
            for model, m in (n.get("models") or {}).items():  # `health_scope: model`: each model's entry
                lines.append(
                    f"{'':<12} {'  #' + model:<40} {m['state']:<8} {m['k']:>2} {m['ejections']:>9} "
                    f"{m['ejected_remaining_s']:>7.1f} {m['failure_rate']:>6.1f} {m['requests']:>8}")
    return "\n".join([*_cluster_lines(status), *lines])


def _cluster_lines(status: dict) -> list[str]:
    """With shared state: which instance this is, the connection, and each node's in-flight across instances."""
    shared = status.get("shared_state")
    if not shared:
        return []
    lines = [f"instance {status.get('instance')}: shared state {shared['state']} ({shared['url']}), "
             f"{len(shared.get('instances') or [])} instances live"]
    for upstream in status["upstreams"]:
        for n in upstream["nodes"]:
            if "cluster" in n:
                lines.append(f"  {upstream['name']} {n['url']}: in flight {n['inflight']} here, "
                             f"{n['cluster']['inflight']} across instances")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def is_loopback(host: str) -> bool:
    """Only this machine can connect to `host` (a host name other than localhost may be anything)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"llm_ha_status: needs HOST:PORT, e.g. 127.0.0.1:9091, got {value!r}")
    return host.strip("[]"), int(port)
