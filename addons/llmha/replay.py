"""What-if evaluation of recorded LLM traffic: with this profile, when would llm-ha have ejected a node?

A recording (a mitmproxy flow file) is turned into `RecordedAttempt`s, one per upstream attempt, and
`evaluate` feeds them, in time order and on their own timestamps, to a fresh `OutlierDetector` built
from the profile. Nothing is sent anywhere.

How an attempt is judged (the same rules as the live gate):
- The limit is the attempt's upstream's `first_byte_timeout` for a streamed request, its
  `request_timeout` for a non-streamed one (the live gate's limits).
- The time the gate would have decided is `start + ttfb` for a streamed answer that passed (ok or a
  later cut), else `start + duration` (the answer, or the failure, was complete then).
- If that time is past `start + limit`, or the recording itself says "timeout", the attempt is a
  timeout failure decided at `start + limit`. A recorded timeout stays a timeout under a looser limit:
  its first byte never came, so when it would have come is unknown.
- Otherwise the recorded outcome stands, decided at that time. A stream cut after its first event
  counts twice, as live: ok at the first event, `stream_cut` at the end.
- The tracker starts (and its intervals are aligned) at the first recorded attempt's start.
- An attempt that starts while the evaluation has its node ejected would have gone to the next node in
  rotation (another node of the same upstream, else a fallback): it is listed as moved and not fed to
  the node. What the fallback would have answered is not in the recording, so it is not fed either.
  When every node is ejected, requests still try them (panic routing, as live): nothing is moved then.
- A request the live proxy sent straight to a fallback (it had ejected the primary) has no primary
  attempt to judge; if the evaluation had the primary in rotation then, it is counted as unobserved.
- Recorded nodes belong to the profile's upstream with that URL, else to the one with the recorded
  upstream name, else (plain recordings) to the primary. When none of an upstream's recorded nodes is
  in the profile (the URLs changed), the recorded nodes stand in for the profile's (the report says so).

Sources of attempts:
- flows recorded through llm-ha (`-w` with the addon): every attempt in `flow.metadata["llm_ha"]`;
- plain recordings of LLM traffic made without llm-ha: one attempt per flow matching the profile's
  `match`; the node is the flow's server (scheme://host:port); outcome from the status code, an SSE
  error event, or flow.error. mitmproxy keeps no per-chunk times, so for a plain streamed flow the TTFB
  is approximated by the time to the response headers (request start to response start). Servers that
  send their headers before the first token (Starlette/FastAPI ones such as vLLM) look faster than they
  were; record through llm-ha to get real first-token times.

Entry points: `ReplayEvaluator` (an addon: `mitmdump -nr traffic.flows -s addons/llm_ha.py
--set llm_ha_profile=... --set llm_ha_replay_report=out.json`) and `python -m llmha.replay`.
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mitmproxy import ctx, flowfilter, http
from mitmproxy import io as flow_io
from mitmproxy.exceptions import FlowReadException

from .core.health import HealthEvent, NodeMonitor, OutlierDetector
from .core.profile import HealthCheck, Profile, ProfileError, Upstream, load_profile
from .core.sse import error_in, iter_data
from .core.types import NodeId, Outcome, status_outcome
from .proxy.modes import mode_url

logger = logging.getLogger("llm_ha")

META_KEY = "llm_ha"
TTFB_APPROXIMATION_NOTE = ("plain streamed flows: TTFB approximated by the time to the response headers "
                           "(mitmproxy keeps no per-chunk times)")
PNG_NEEDS_MATPLOTLIB = ("llm-ha: the PNG timeline needs matplotlib, which is not installed: "
                        "pip install matplotlib (or the project's [plot] extra)")


class ReplayError(Exception):
    """A problem worth one line to the user: bad file, no matplotlib, ..."""


# -- what a recording holds

@dataclass(frozen=True)
class RecordedAttempt:
    request_id: str  # the flow's id: the attempts of one request share it
    index: int  # 0 for the request's first attempt
    upstream: str | None  # the upstream name llm-ha recorded; None in a plain recording
    node: str  # base URL, scheme://host:port[/prefix]
    start: float  # unix seconds
    outcome: str  # an `Outcome` value, as recorded
    status: int | None = None
    ttfb_s: float | None = None
    duration_s: float | None = None
    timeout_s: float | None = None  # the limit the live proxy applied, when recorded through llm-ha
    streamed: bool = True  # the client asked for a stream ("stream": true)
    ttfb_approximated: bool = False  # plain streamed flow: time to the response headers


def attempts_from_flow(flow, match: flowfilter.TFilter | None = None) -> list[RecordedAttempt]:
    """The attempts of one recorded flow; a plain flow counts only if it passes `match` (when given)."""
    if not isinstance(flow, http.HTTPFlow):
        return []
    meta = flow.metadata.get(META_KEY)
    if isinstance(meta, dict) and isinstance(meta.get("attempts"), list):
        return _attempts_from_metadata(flow, meta["attempts"])
    if match is not None and not match(flow):
        return []
    attempt = _attempt_from_plain_flow(flow)
    return [attempt] if attempt else []


def attempts_from_flows(flows: Iterable, match: str | None = None) -> list[RecordedAttempt]:
    matcher = flowfilter.parse(match) if match else None
    return [a for flow in flows for a in attempts_from_flow(flow, matcher)]


def read_attempts(path: str | Path, match: str | None = None) -> list[RecordedAttempt]:
    """Every attempt in a flow file; ReplayError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return attempts_from_flows(flow_io.FlowReader(f).stream(), match)
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror or e}") from None
    except FlowReadException as e:
        raise ReplayError(f"{path} is not a mitmproxy flow file: {e}") from None


def _attempts_from_metadata(flow: http.HTTPFlow, records: list[dict]) -> list[RecordedAttempt]:
    streamed = _asks_for_stream(flow.request)
    attempts = []
    for index, r in enumerate(records):
        if _known_outcome(r.get("outcome")) is None or r.get("start") is None:
            logger.debug(f"llm-ha replay: skipping an attempt without a known outcome: {r}")
            continue
        attempts.append(RecordedAttempt(
            request_id=flow.id, index=index, upstream=r.get("upstream"), node=str(r.get("node", "")).rstrip("/"),
            start=float(r["start"]), outcome=r["outcome"], status=r.get("status"), ttfb_s=r.get("ttfb_s"),
            duration_s=r.get("duration_s"), timeout_s=r.get("timeout_s"), streamed=streamed,
        ))
    return attempts


def _attempt_from_plain_flow(flow: http.HTTPFlow) -> RecordedAttempt | None:
    request, response = flow.request, flow.response
    start = request.timestamp_start
    if start is None:
        return None
    streamed = _asks_for_stream(request) or _is_event_stream(response)
    ttfb = response.timestamp_start - start if response and response.timestamp_start else None
    end = (response.timestamp_end if response else None) or (flow.error.timestamp if flow.error else None)
    return RecordedAttempt(
        request_id=flow.id, index=0, upstream=None, node=f"{request.scheme}://{request.host}:{request.port}",
        start=start, outcome=plain_outcome(flow).value, status=response.status_code if response else None,
        ttfb_s=ttfb, duration_s=end - start if end else None, streamed=streamed,
        ttfb_approximated=streamed and ttfb is not None,
    )


_CONNECT_ERROR_MARKERS = ("refused", "connect call failed", "cannot connect", "could not connect", "unreachable",
                          "no route to host", "name or service not known", "nodename nor servname")


def plain_outcome(flow: http.HTTPFlow) -> Outcome:
    """The outcome llm-ha would have given a flow recorded without it."""
    response, error = flow.response, flow.error
    if response is None:
        message = (error.msg if error else "").lower()
        if any(marker in message for marker in _CONNECT_ERROR_MARKERS):
            return Outcome.CONNECT_ERROR
        if "timeout" in message or "timed out" in message:
            return Outcome.TIMEOUT
        return Outcome.RESET
    outcome = status_outcome(response.status_code)
    if outcome is not Outcome.OK:
        return outcome
    if _first_event_is_error(response):
        return Outcome.IN_BAND_ERROR
    return Outcome.STREAM_CUT if error else Outcome.OK


def _first_event_is_error(response: http.Response) -> bool:
    body = response.get_content(strict=False) or b""
    if _is_event_stream(response):
        first = next(iter_data(body), None)
        return first is not None and error_in(first) is not None
    return body[:1] == b"{" and error_in(body.decode("utf-8", "replace")) is not None


def _asks_for_stream(request: http.Request) -> bool:
    try:
        body = json.loads(request.get_content(strict=False) or b"")
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


def _is_event_stream(response: http.Response | None) -> bool:
    return bool(response) and "text/event-stream" in response.headers.get("content-type", "")


def _known_outcome(value) -> Outcome | None:
    try:
        return Outcome(value)
    except ValueError:
        return None


# -- judging one attempt as the profile would

@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    decided_at: float
    limit: float
    became_timeout: bool  # the recording says it passed (or failed later); the profile's limit fails it
    cut_at: float | None = None  # a stream cut: when the second (stream_cut) record is due


def judge(attempt: RecordedAttempt, upstream: Upstream) -> Verdict:
    recorded = Outcome(attempt.outcome)
    limit = upstream.first_byte_timeout if attempt.streamed else upstream.request_timeout
    passed_stream = attempt.streamed and recorded in (Outcome.OK, Outcome.STREAM_CUT)
    elapsed = attempt.ttfb_s if passed_stream else _first_known(attempt.duration_s, attempt.ttfb_s)
    if recorded is Outcome.TIMEOUT or (elapsed is not None and elapsed > limit):
        return Verdict(Outcome.TIMEOUT, attempt.start + limit, limit,
                       became_timeout=recorded is not Outcome.TIMEOUT)
    decided_at = attempt.start + (elapsed or 0.0)
    if recorded is Outcome.STREAM_CUT and passed_stream:
        cut_at = attempt.start + _first_known(attempt.duration_s, elapsed, 0.0)
        return Verdict(Outcome.OK, decided_at, limit, False, cut_at=max(cut_at, decided_at))
    return Verdict(recorded, decided_at, limit, False)


def _first_known(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


# -- the report

@dataclass(frozen=True)
class Ejection:
    start: float
    end: float  # as scheduled: ejections end by themselves
    k: int
    failure_rate: float | None


@dataclass(frozen=True)
class IntervalRate:
    start: float
    end: float
    requests: int
    failures: int
    failure_rate: float
    judged: bool  # False: the node was ejected at the boundary, so this interval could not eject it


@dataclass
class JudgedAttempt:
    attempt: RecordedAttempt
    node: NodeId
    verdict: Verdict
    fate: str = "fed"  # fed | moved
    moved_to: str | None = None  # "upstream url" of the node that would have taken it


@dataclass
class NodeReport:
    node: NodeId
    attempts: int = 0  # recorded at this node
    fed: int = 0  # judged by the evaluation (not moved)
    outcomes: Counter = field(default_factory=Counter)  # what-if outcomes of the fed attempts
    became_timeouts: int = 0
    moved: int = 0
    ejections: list[Ejection] = field(default_factory=list)
    intervals: list[IntervalRate] = field(default_factory=list)

    @property
    def failures(self) -> dict[str, int]:
        return {o: n for o, n in sorted(self.outcomes.items()) if Outcome(o).failed}

    @property
    def ejected_seconds(self) -> float:
        return sum(e.end - e.start for e in self.ejections)


@dataclass
class Report:
    profile: Profile
    start: float
    end: float
    nodes: list[NodeReport]
    attempts: list[JudgedAttempt]
    events: list[dict]
    requests: int
    unobserved: int
    notes: list[str]

    def node(self, url_or_upstream: str) -> NodeReport:
        return next(n for n in self.nodes if url_or_upstream in (n.node.url, n.node.upstream))

    @property
    def moved(self) -> list[JudgedAttempt]:
        return [j for j in self.attempts if j.fate == "moved"]

    def to_dict(self) -> dict:
        rel = self._relative
        return {
            "profile": self.profile.path,
            "settings": _settings(self.profile),
            "start": self.start, "end": self.end, "duration_s": rel(self.end),
            "notes": self.notes,
            "totals": {"requests": self.requests, "attempts": len(self.attempts), "moved": len(self.moved),
                       "unobserved": self.unobserved},
            "nodes": [self._node_dict(n) for n in self.nodes],
            "moved": [{"request": j.attempt.request_id, "ts": j.attempt.start, "t_s": rel(j.attempt.start),
                       "upstream": j.node.upstream, "node": j.node.url, "moved_to": j.moved_to} for j in self.moved],
            "events": [{**e, "t_s": rel(e["ts"])} for e in self.events],
            "attempts": [self._attempt_dict(j) for j in self.attempts],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _relative(self, ts: float) -> float:
        return round(ts - self.start, 3)

    def _node_dict(self, n: NodeReport) -> dict:
        rel = self._relative
        return {
            "upstream": n.node.upstream, "url": n.node.url, "attempts": n.attempts, "fed": n.fed,
            "outcomes": dict(sorted(n.outcomes.items())), "failures": n.failures,
            "became_timeouts": n.became_timeouts, "moved": n.moved, "ejected_s": round(n.ejected_seconds, 3),
            "ejections": [{**asdict(e), "start_s": rel(e.start), "end_s": rel(e.end),
                           "duration_s": round(e.end - e.start, 3)} for e in n.ejections],
            "intervals": [{**asdict(i), "start_s": rel(i.start)} for i in n.intervals],
        }

    def _attempt_dict(self, j: JudgedAttempt) -> dict:
        a, v = j.attempt, j.verdict
        return {"request": a.request_id, "index": a.index, "upstream": j.node.upstream, "node": j.node.url,
                "start": a.start, "t_s": self._relative(a.start), "ttfb_ms": _ms(a.ttfb_s),
                "duration_ms": _ms(a.duration_s), "recorded": a.outcome, "outcome": v.outcome.value,
                "limit_ms": _ms(v.limit), "fate": j.fate, "moved_to": j.moved_to,
                "ttfb_approximated": a.ttfb_approximated}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _settings(profile: Profile) -> dict:
    hc = profile.health_check
    return {"failure_rate_threshold": hc.failure_rate_threshold, "interval_s": hc.interval,
            "base_ejection_time_s": hc.base_ejection_time, "max_ejection_time_s": hc.max_ejection_time,
            "min_requests": hc.min_requests, "k_decay_after_s": hc.k_decay_period,
            "upstreams": [{"name": u.name, "nodes": list(u.nodes), "first_byte_timeout_s": u.first_byte_timeout,
                           "request_timeout_s": u.request_timeout} for u in profile.upstreams]}


# -- the evaluation

class _HistoryMonitor(NodeMonitor):
    """A NodeMonitor that keeps every non-empty interval's failure rate."""

    def __init__(self, node: NodeId, config: HealthCheck, now: float) -> None:
        super().__init__(node, config, now)
        self.history: list[IntervalRate] = []

    def close_interval(self, boundary: float) -> HealthEvent | None:
        total, failed = self.bucket_total, self.bucket_failed
        judged = self.ejected_until is None
        event = super().close_interval(boundary)
        if total:
            self.history.append(IntervalRate(boundary - self.config.interval, boundary, total, failed,
                                             round(self.last_failure_rate, 2), judged))
        return event


class _HistoryDetector(OutlierDetector):
    def new_monitor(self, node: NodeId, now: float) -> _HistoryMonitor:
        return _HistoryMonitor(node, self.config, now)


class _Evaluation:
    """One run of `evaluate`: the detector, the placed attempts, and a time-ordered queue."""

    ARRIVE, DECIDE = 0, 1

    def __init__(self, attempts: Sequence[RecordedAttempt], profile: Profile) -> None:
        self.profile = profile
        self.start = min(a.start for a in attempts)
        self.judged = [self._place(a) for a in sorted(attempts, key=lambda a: (a.start, a.request_id, a.index))]
        self.order, self.notes = _node_order(profile, [j.node for j in self.judged])
        self.events: list[HealthEvent] = []
        self.tracker = _HistoryDetector(profile.health_check, self.order, self.start, self.events.append)
        self.unobserved = 0
        self.end = self.start

    def _place(self, attempt: RecordedAttempt) -> JudgedAttempt:
        upstream = _upstream_of(attempt, self.profile)
        return JudgedAttempt(attempt, NodeId(upstream.name, attempt.node), judge(attempt, upstream))

    def run(self) -> None:
        queue = [(j.attempt.start, self.ARRIVE, i, None) for i, j in enumerate(self.judged)]
        heapq.heapify(queue)
        while queue:
            ts, kind, i, outcome = heapq.heappop(queue)
            self.end = max(self.end, ts)
            if kind == self.ARRIVE:
                for due, record in self._arrive(self.judged[i], ts):
                    heapq.heappush(queue, (due, self.DECIDE, i, record))
            else:
                self.tracker.record(self.judged[i].node, outcome, ts)
        self.tracker.advance(self.end + self.profile.health_check.interval)  # close the last interval

    def _arrive(self, j: JudgedAttempt, ts: float) -> list[tuple[float, Outcome]]:
        """Admit or move an arriving attempt; the records it will make, when."""
        self._note_unobserved(j, ts)
        if not self.tracker.is_available(j.node, ts):
            destination = next((n for n in self.order if n != j.node and self.tracker.is_available(n, ts)), None)
            if destination is not None:
                j.fate, j.moved_to = "moved", str(destination)
                return []
        v = j.verdict
        records = [(v.decided_at, v.outcome)]
        if v.cut_at is not None:
            records.append((v.cut_at, Outcome.STREAM_CUT))
        return records

    def _note_unobserved(self, j: JudgedAttempt, ts: float) -> None:
        primary = self.profile.upstreams[0]
        if j.attempt.index == 0 and j.node.upstream != primary.name:
            nodes = [n for n in self.order if n.upstream == primary.name]
            if any(self.tracker.is_available(n, ts) for n in nodes):
                self.unobserved += 1

    def report(self) -> Report:
        events = [e.to_dict() for e in self.events]
        nodes = [self._node_report(n, events) for n in self.order]
        approximated = sum(1 for j in self.judged if j.attempt.ttfb_approximated)
        notes = [f"{approximated} {TTFB_APPROXIMATION_NOTE}"] if approximated else []
        notes += self.notes
        if self.unobserved:
            notes.append(f"{self.unobserved} requests went straight to a fallback in the recording while this "
                         "profile had the primary in rotation: how the primary would have answered is unknown")
        requests = len({j.attempt.request_id for j in self.judged})
        return Report(self.profile, self.start, self.end, nodes, self.judged, events, requests, self.unobserved, notes)

    def _history(self, node: NodeId) -> list[IntervalRate]:
        monitor = self.tracker.monitors[node]
        assert isinstance(monitor, _HistoryMonitor)
        return monitor.history

    def _node_report(self, node: NodeId, events: list[dict]) -> NodeReport:
        mine = [j for j in self.judged if j.node == node]
        fed = [j for j in mine if j.fate == "fed"]
        report = NodeReport(node, attempts=len(mine), fed=len(fed), moved=len(mine) - len(fed),
                            became_timeouts=sum(j.verdict.became_timeout for j in fed),
                            intervals=self._history(node))
        for j in fed:
            report.outcomes[j.verdict.outcome.value] += 1
            if j.verdict.cut_at is not None:
                report.outcomes[Outcome.STREAM_CUT.value] += 1
        report.ejections = [Ejection(e["ts"], e["ts"] + e["duration_s"], e["k"], e["failure_rate"]) for e in events
                            if e["action"] == "eject" and (e["upstream"], e["node"]) == (node.upstream, node.url)]
        return report


def _upstream_of(attempt: RecordedAttempt, profile: Profile) -> Upstream:
    """The profile's upstream for a recorded node: by URL, else by recorded upstream name, else the primary."""
    by_url = [u for u in profile.upstreams if attempt.node in u.nodes]
    by_name = [u for u in profile.upstreams if u.name == attempt.upstream]
    both = [u for u in by_url if u in by_name]
    return (both or by_url or by_name or [profile.upstreams[0]])[0]


def _node_order(profile: Profile, seen: Iterable[NodeId]) -> tuple[list[NodeId], list[str]]:
    """The evaluation's nodes in candidate order (upstream by upstream), and notes on stand-ins.

    An upstream's nodes are its profile nodes plus the recording's other nodes of it; but when none of
    its recorded nodes is in the profile (the URLs changed, e.g. another port), the recorded nodes stand
    in for the profile's, which would otherwise look like idle healthy nodes taking the moved requests.
    """
    seen = list(dict.fromkeys(seen))
    order, notes = [], []
    for upstream in profile.upstreams:
        recorded = [n for n in seen if n.upstream == upstream.name]
        listed = [NodeId(upstream.name, url) for url in upstream.nodes]
        if recorded and not set(recorded) & set(listed):
            notes.append(f"{upstream.name}: the recorded nodes {', '.join(n.url for n in recorded)} stand in for "
                         f"the profile's {', '.join(upstream.nodes)}")
            listed = []
        order += listed + [n for n in recorded if n not in listed]
    return order, notes


def evaluate(attempts: Sequence[RecordedAttempt], profile: Profile) -> Report:
    """What the profile's health check would have done with these recorded attempts. Pure: no I/O."""
    if not attempts:
        nodes = [NodeReport(n) for n in _node_order(profile, [])[0]]
        return Report(profile, 0.0, 0.0, nodes, [], [], 0, 0, ["the recording holds no LLM attempt"])
    evaluation = _Evaluation(attempts, profile)
    evaluation.run()
    return evaluation.report()


# -- output: table, PNG, files

def render_table(report: Report, width: int = 120) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    for table in _tables(report):
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    return buffer.getvalue()


def _tables(report: Report) -> list:
    from rich.table import Table

    hc = report.profile.health_check
    title = (f"llm-ha what-if: {report.profile.name} (threshold {hc.failure_rate_threshold:g}%, interval "
             f"{hc.interval:g}s, base ejection {hc.base_ejection_time:g}s) over {report.end - report.start:.1f}s, "
             f"{report.requests} requests")
    nodes = Table(title=title, title_justify="left")
    for column in ("upstream", "node", "attempts", "judged", "failures", "late→timeout", "moved", "ejections",
                   "ejected s"):
        nodes.add_column(column, justify="left" if column in ("upstream", "node", "failures") else "right")
    for n in report.nodes:
        failures = ", ".join(f"{o} {c}" for o, c in n.failures.items()) or "-"
        nodes.add_row(n.node.upstream, n.node.url, str(n.attempts), str(n.fed), failures, str(n.became_timeouts),
                      str(n.moved), str(len(n.ejections)), f"{n.ejected_seconds:g}")
    ejections = Table(title="ejection periods (seconds from the first request)", title_justify="left")
    for column in ("upstream", "node", "start", "end", "k", "failure rate"):
        ejections.add_column(column, justify="left" if column in ("upstream", "node") else "right")
    for n in report.nodes:
        for e in n.ejections:
            rate = "by hand" if e.failure_rate is None else f"{e.failure_rate:.0f}%"
            ejections.add_row(n.node.upstream, n.node.url, f"{e.start - report.start:.2f}",
                              f"{e.end - report.start:.2f}", str(e.k), rate)
    return [nodes, ejections] if ejections.row_count else [nodes]


def write_timeline_png(report: Report, path: str | Path) -> None:
    """Figure 13 of the source document, from the evaluation: TTFB per request over time, coloured by
    who served it, failures marked, ejections shaded; below, each node's failure rate per interval."""
    try:
        import matplotlib
    except ImportError:
        raise ReplayError(PNG_NEEDS_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttfb_ax, rate_ax) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 1.4]})
    _plot_ttfb(ttfb_ax, report)
    _plot_failure_rates(rate_ax, report)
    for ax in (ttfb_ax, rate_ax):
        _shade_ejections(ax, report)
    rate_ax.set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_COLOURS = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive"]


def _colour(report: Report, upstream: str) -> str:
    names = [u.name for u in report.profile.upstreams]
    return _COLOURS[names.index(upstream) % len(_COLOURS)] if upstream in names else "tab:gray"


def _plot_ttfb(ax, report: Report) -> None:
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for j in report.attempts:
        y = j.attempt.ttfb_s if j.attempt.ttfb_s is not None else (j.attempt.timeout_s or j.verdict.limit)
        kind = "moved" if j.fate == "moved" else ("failed" if j.verdict.outcome.failed else "served")
        groups.setdefault((j.node.upstream, kind), []).append((j.attempt.start - report.start, y * 1000))
    styles = {"served": dict(marker="o", s=14), "failed": dict(marker="x", s=22, color="tab:red"),
              "moved": dict(marker="o", s=14, facecolors="none", color="tab:gray")}
    labels = {"served": "{} served", "failed": "{} failed (this profile)", "moved": "{} moved (node ejected)"}
    for (upstream, kind), points in sorted(groups.items()):
        xs, ys = zip(*points)
        style = dict(styles[kind])
        style.setdefault("color", _colour(report, upstream))
        ax.scatter(xs, ys, label=labels[kind].format(upstream), **style)
    for u in report.profile.upstreams[:1]:
        ax.axhline(u.first_byte_timeout * 1000, color="tab:red", linestyle="--", linewidth=1,
                   label=f"{u.name} first-byte timeout {u.first_byte_timeout * 1000:g} ms")
    approximated = " (time to response headers)" if any(j.attempt.ttfb_approximated for j in report.attempts) else ""
    ax.set_ylabel(f"TTFB ms{approximated}")
    ax.set_title(f"llm-ha what-if with {report.profile.name}: first-byte time per request; shaded: node ejected")
    ax.legend(loc="upper left", fontsize=8)


def _plot_failure_rates(ax, report: Report) -> None:
    """One short line per interval that had attempts: empty intervals show as gaps, not as 0 %."""
    for n in report.nodes:
        if n.intervals:
            colour = _colour(report, n.node.upstream)
            ax.hlines([i.failure_rate for i in n.intervals], [i.start - report.start for i in n.intervals],
                      [i.end - report.start for i in n.intervals], colors=colour, linewidth=2.5,
                      label=f"{n.node.upstream} {n.node.url}")
    ax.axhline(report.profile.health_check.failure_rate_threshold, color="tab:red", linestyle="--", linewidth=1,
               label="threshold")
    ax.set_ylabel("failure rate % per interval")
    ax.set_ylim(-5, 105)
    ax.legend(loc="upper left", fontsize=8)


def _shade_ejections(ax, report: Report) -> None:
    for n in report.nodes:
        for e in n.ejections:
            ax.axvspan(e.start - report.start, e.end - report.start, color=_colour(report, n.node.upstream),
                       alpha=0.12, linewidth=0)


def write_outputs(report: Report, json_path: str | Path | None, png_path: str | Path | None) -> list[str]:
    """Write the JSON and the PNG; the problems met (e.g. no matplotlib), one line each."""
    problems = []
    if json_path:
        Path(json_path).write_text(report.to_json() + "\n", encoding="utf-8")
    if png_path:
        try:
            write_timeline_png(report, png_path)
        except ReplayError as e:
            problems.append(str(e))
    return problems


# -- entry point (a): an addon evaluating the flows mitmdump reads with -r

class ReplayEvaluator:
    """Collects flows read from a file (not live) and, when mitmdump is done, evaluates them (for the
    `ReplayReport` addon, which declares `llm_ha_replay_report` and makes this once a report is asked for).

        mitmdump -n -r traffic.flows -s addons/llm_ha.py --set llm_ha_profile=profiles/x.yaml \\
            --set llm_ha_replay_report=out.json

    mitmdump -n -r reads the file after `running` and shuts down once it is read, then `done` fires:
    the report (JSON), the table (stdout) and the timeline (out.png beside the JSON) are made there.
    """

    def __init__(self) -> None:
        self.attempts: list[RecordedAttempt] = []
        self.flows = 0
        self._seen: set[str] = set()
        self._profile: Profile | None = None
        self._profile_key: tuple | None = None
        self._match: flowfilter.TFilter | None = None

    def collect(self, flow: http.HTTPFlow) -> None:
        """A flow read from the recording (the addon `ReplayReport` passes each on, once a report is asked for)."""
        if flow.live or not ctx.options.llm_ha_replay_report or flow.id in self._seen:
            return
        if self.profile() is None:
            return
        self._seen.add(flow.id)
        self.flows += 1
        self.attempts.extend(attempts_from_flow(flow, self._match))

    def profile(self) -> Profile | None:
        """The profile named by llm_ha_profile (loaded once per path and mode); None, logged, if unusable."""
        key = (ctx.options.llm_ha_profile, tuple(ctx.options.mode))
        if key != self._profile_key:
            self._profile_key, self._profile = key, None
            try:
                self._profile = self._load_profile()
                self._match = flowfilter.parse(self._profile.match)
            except (ProfileError, ReplayError) as e:
                logger.error(f"llm-ha replay: {e}")
            except ValueError as e:
                logger.error(f"llm-ha replay: {ctx.options.llm_ha_profile}: match: not a valid filter ({e})")
                self._profile = None
        return self._profile

    @staticmethod
    def _load_profile() -> Profile:
        path = ctx.options.llm_ha_profile
        if not path:
            raise ReplayError("llm_ha_replay_report needs llm_ha_profile: the profile to evaluate the recording with")
        return load_profile(Path(path).expanduser(), reverse_target=mode_url(ctx.options.mode, "reverse"))

    def done(self) -> None:
        out = ctx.options.llm_ha_replay_report
        if not out or self.profile() is None:
            return
        if self.flows == 0:
            logger.warning("llm-ha replay: no recorded flows were read (give the recording with -r FILE); no report")
            return
        report = evaluate(self.attempts, self._profile)
        png = Path(out).with_suffix(".png")
        problems = write_outputs(report, out, png)
        print(render_table(report), flush=True)
        for problem in problems:
            logger.warning(problem)
        written = out if problems else f"{out} and {png}"
        logger.warning(f"llm-ha replay: {self.flows} flows, {report.requests} requests evaluated; wrote {written}")


# -- entry point (b): python -m llmha.replay

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llmha.replay",
        description="What-if evaluation of a recording: when would this profile's health check have ejected "
                    "each node? Reads a mitmproxy flow file (recorded with or without llm-ha); sends nothing.")
    p.add_argument("flows", help="mitmproxy flow file (mitmdump -w)")
    p.add_argument("--profile", required=True, help="the llm-ha profile (YAML) to evaluate with")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--png", help="write the TTFB/ejection timeline here (needs matplotlib)")
    p.add_argument("--reverse-target", help="URL standing in for a primary without nodes (reverse mode)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = load_profile(args.profile, reverse_target=args.reverse_target)
        report = evaluate(read_attempts(args.flows, profile.match), profile)
    except (ProfileError, ReplayError) as e:
        hint = " (give --reverse-target URL)" if isinstance(e, ProfileError) and e.key.endswith(".nodes") else ""
        print(f"llm-ha replay: {e}{hint}", file=sys.stderr)
        return 2
    problems = write_outputs(report, args.report, args.png)
    if not args.quiet:
        print(render_table(report), end="")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
