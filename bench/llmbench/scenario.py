"""The source document's incident, reproduced: a traffic spike on a self-hosted model, with and without llm-ha.

One run (`run_scenario`) starts

- the primary simulator (`--preset primary`: DeepSeek-R1-Distill-Qwen-7B on one A10, which queues,
  slows down and crashes when it runs out of GPU memory, then restarts for 180 s),
- the fallback simulator (`--preset fallback`: qwen-plus at a cloud provider, never overloaded),
- unless the variant is "no protection", mitmdump with llm-ha in reverse mode in front of the primary,
  with the event log and `/status` on,

sends the seeded open-loop load (`llmsim.loadgen.run_load`: steady, a spike of about three times
what the primary can serve, steady again) to mitmdump (or straight to the primary), and collects
what happened: every request's record, the primary's stats (crashes and when), llm-ha's events
(ejections with their k and durations). Every process is stopped at the end, also on failure or
Ctrl-C. The pure functions below (`summarize_run`, `ejection_periods`, `down_periods`,
`primary_possible`) turn that into the figures that `make demo` and `make bench-spike` print.

Time scale. Everything is defined in the document's time (seconds as they pass for the real
model): the load's phases, the simulator's physics and its 180 s restart, the profile's durations.
A run at time scale `s` multiplies every duration by `s` and divides every rate by it: the
simulators get `--time-scale s`, the load runs `s` times as long at `1/s` times the rate, and the
profile written for the run has `first_byte_timeout = 200 ms * s`, `interval = 1 s * s`,
`base_ejection_time = 30 s * s` and so on, so that every ratio of the document holds. What cannot
be scaled is the proxy's own cost per request and per streamed token: at small `s` the same work is
squeezed into less wall time, and on a small machine the proxy's event-loop lag then eats into the
(scaled) first-byte timeout. `DEFAULT_SCALE` is 1 for that reason. Measured on the 2-core development
machine (shared with other work): mitmdump with llm-ha spends about 20 ms of CPU per streamed 64-token
answer and the openai-based load generator about as much, so the spike's 14 requests/s take about
two thirds of a core and keep the proxy's added TTFT at tens of ms; at 28 requests/s (time scale 0.5, or
the spike twice as large at scale 1) the proxy's event loop lagged by 100-500 ms, attempts to a primary
that had answered in time were counted as timeouts, and at scale 0.5 the 100 ms first-byte timeout
ejected the primary even under the limits. At scale 1 the demo takes about 90 s; a faster machine can
use e.g. `--scale 0.5`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmsim.control import SimProcess, free_port, start_simulator
from llmsim.loadgen import Phase, Record, percentile, run_load, write_records
from llmsim.server import PRESETS
from llmsim.server import PRIMARY as PRIMARY_PHYSICS

from .proxy import ADDON, REPO, MitmProcess, _wait_until_up, mitmdump_command, start_mitmdump

PRIMARY_MODEL = PRESETS["primary"][0]
FALLBACK_MODEL = PRESETS["fallback"][0]
DEFAULT_OUT = REPO / "out"
DEFAULT_SEED = 7
DEFAULT_SCALE = 1.0


# ---------------------------------------------------------------------------------------------------
# What is run: the document's settings, the load, the variants
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The source document's settings (seconds, percent), before time scaling."""

    failure_rate_threshold: float = 50.0
    interval: float = 1.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    first_byte_timeout: float = 0.2
    fallback_first_byte_timeout: float = 5.0  # the last resort may take its time
    request_timeout: float = 600.0
    restart_time: float = PRIMARY_PHYSICS.restart_time  # the document's "about 3 minutes"
    # limits (README "Preventing overload"): the batch size as the cap, adaptive, slow start
    max_inflight: int = PRIMARY_PHYSICS.max_batch
    min_inflight: int = 2
    slow_start: float = 30.0


REFERENCE = Reference()


@dataclass(frozen=True)
class SpikeLoad:
    """The open-loop load in document time: `before_s` at `steady_rate`, `spike_s` at `spike_rate`, `after_s` steady.

    With 64-token answers the primary serves about 4.7 requests/s at its full batch of 16 (see
    `estimated_capacity`); 2 requests/s is a comfortable load, 14 requests/s about three times its capacity.
    The spike ends 10 s before the first ejection (30 s) would end, so the primary returns to steady
    traffic: the document's "later the primary returns, first-byte RT falls back and stays stable".
    """

    steady_rate: float = 2.0
    spike_rate: float = 14.0
    before_s: float = 15.0
    spike_s: float = 20.0
    after_s: float = 45.0
    max_tokens: int = 64

    @property
    def duration(self) -> float:
        return self.before_s + self.spike_s + self.after_s

    def phases(self, scale: float = 1.0, spike_factor: float = 1.0) -> list[Phase]:
        """The loadgen phases in wall time: durations times `scale`, rates divided by it."""
        return [
            Phase(self.before_s * scale, self.steady_rate / scale, "steady"),
            Phase(self.spike_s * scale, self.spike_rate * spike_factor / scale, "spike"),
            Phase(self.after_s * scale, self.steady_rate / scale, "after"),
        ]

    def spike_window(self, scale: float = 1.0) -> tuple[float, float]:
        """Seconds after the load's start (wall time) when the spike begins and ends."""
        return self.before_s * scale, (self.before_s + self.spike_s) * scale


DEFAULT_LOAD = SpikeLoad()


@dataclass(frozen=True)
class Variant:
    """One way of running the spike."""

    name: str  # short, for --only and file names
    title: str
    label: str = ""  # shorter, for the table; default: the title
    proxy: bool = True  # False: clients straight to the primary
    transparent_failover: bool = True
    limits: bool = False
    adaptive: bool = True  # with limits: the adaptive limit (else a fixed cap of max_inflight)
    spike_factor: float = 1.0  # multiplies the spike's rate
    resume: str = "off"  # the fallback's `resume`: may it continue a stream broken on the primary


VARIANTS = {v.name: v for v in (
    Variant("none", "no protection", "no protection", proxy=False),
    Variant("no-failover", "llm-ha, transparent failover off (the document's)", "llm-ha, failover off",
            transparent_failover=False),
    Variant("llm-ha", "llm-ha as built (transparent failover, ejection)", "llm-ha"),
    Variant("limits", "llm-ha + limits (adaptive)", "llm-ha + limits", limits=True),
    Variant("limits-2x", "llm-ha + limits (adaptive), spike twice as large", "llm-ha + limits, 2x spike",
            limits=True, spike_factor=2.0),
    Variant("fixed-cap", "llm-ha + a fixed cap of 16 in flight (not adaptive)", "llm-ha + fixed cap 16",
            limits=True, adaptive=False),
    Variant("resume", "llm-ha + streams broken on the primary continued on the fallback", "llm-ha + resume",
            resume="prefill"),
)}


def selected_runs(parser, only: list[str], known) -> list[str]:
    """The runs `--only NAME,NAME` (given any number of times) asks for; a name not in `known` is a usage error."""
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; known: {', '.join(known)}")
    return names


def estimated_capacity(max_tokens: int, prompt_tokens: int = 32, batch: int | None = None) -> float:
    """Requests per second (document time) the primary completes at its full batch, from its physics.

    A full batch of `batch` sequences finishes one answer per `max_tokens - 1` decode steps each, and
    every admission stalls the batch for one prefill. With `n` admissions a second:
    n = batch / ((max_tokens - 1) * step(batch)) * (1 - n * prefill)  ->  n = r / (1 + r * prefill).
    """
    p = PRIMARY_PHYSICS
    batch = batch or p.max_batch
    rate = batch / (max(1, max_tokens - 1) * p.step_time(batch))
    return rate / (1 + rate * p.prefill(prompt_tokens))


def describe_scale(scale: float, reference: Reference = REFERENCE) -> str:
    """One sentence saying how time runs, e.g. 'time runs 2x faster: ...'."""
    def s(seconds: float) -> str:
        scaled = seconds * scale
        return f"{scaled * 1000:.0f} ms" if scaled < 1 else f"{scaled:g} s"

    details = (f"the {reference.restart_time:g} s restart takes {s(reference.restart_time)}; the profile's "
               f"{reference.base_ejection_time:g} s base ejection is {s(reference.base_ejection_time)}, its "
               f"{reference.interval:g} s interval {s(reference.interval)}, its "
               f"{reference.first_byte_timeout * 1000:.0f} ms first-byte timeout {s(reference.first_byte_timeout)}")
    if math.isclose(scale, 1.0):
        return (f"time runs at the document's pace (time scale 1): the {reference.restart_time:g} s restart takes "
                f"{reference.restart_time:g} s, ejections last k x {reference.base_ejection_time:g} s, "
                f"the first-byte timeout is {reference.first_byte_timeout * 1000:.0f} ms")
    speed = 1 / scale
    how = f"{speed:g}x faster" if speed > 1 else f"{scale:g}x slower"
    return f"time runs {how} (time scale {scale:g}): {details}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def profile_text(variant: Variant, scale: float, fallback_url: str, reference: Reference = REFERENCE) -> str:
    """The llm-ha profile of one run: the document's settings, every duration times `scale`."""
    r, s = reference, scale

    def d(seconds: float) -> str:
        return _duration(round(seconds * s, 6))

    limits = ""
    if variant.limits:
        limits = f"    max_inflight: {r.max_inflight}        # the primary's batch size\n"
        if variant.adaptive:
            limits += (f"    adaptive: true          # learned from the time to first byte\n"
                       f"    min_inflight: {r.min_inflight}\n")
        limits += f"    slow_start: {d(r.slow_start):<14}# {r.slow_start:g} s x {s:g}, after a return from ejection\n"
    return (
        f"# demo-spike: the traffic-spike scenario's profile ({variant.title}), written by llmbench.scenario.\n"
        f"#\n"
        f"# The source document's reference settings (failure rate threshold 50 %, interval 1 s, base\n"
        f"# ejection 30 s, first-byte timeout 200 ms) with every duration multiplied by the time scale\n"
        f"# {s:g}, the same factor as the simulators' --time-scale, so every ratio of the document holds.\n"
        f"# The primary is the reverse-proxy target (the primary simulator); the fallback another simulator.\n"
        f"match: \"~u /v1/\"\n"
        f"first_byte_timeout: {d(r.first_byte_timeout):<14}# {r.first_byte_timeout * 1000:g} ms x {s:g}\n"
        f"request_timeout: {d(r.request_timeout)}\n"
        f"transparent_failover: {'true' if variant.transparent_failover else 'false'}\n"
        f"health_check:\n"
        f"  failure_rate_threshold: {r.failure_rate_threshold:g}\n"
        f"  interval: {d(r.interval):<22}# {r.interval:g} s x {s:g}\n"
        f"  base_ejection_time: {d(r.base_ejection_time):<12}# {r.base_ejection_time:g} s x {s:g}\n"
        f"  max_ejection_time: {d(r.max_ejection_time):<13}# {r.max_ejection_time:g} s x {s:g}\n"
        f"  min_requests: 1\n"
        f"upstreams:\n"
        f"  - name: primary           # nodes omitted: the reverse-proxy target\n"
        f"{limits}"
        f"  - name: fallback\n"
        f"    nodes: [\"{fallback_url}\"]\n"
        f"    first_byte_timeout: {d(r.fallback_first_byte_timeout):<8}# {r.fallback_first_byte_timeout:g} s x {s:g}\n"
        + (f"    resume: {variant.resume}\n" if variant.resume != "off" else "")
    )


# ---------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one run produced; times are unix seconds, `t0` the load's start."""

    variant: Variant
    scale: float
    seed: int
    load: SpikeLoad
    t0: float
    t_end: float
    records: list[Record]
    primary_stats: dict
    fallback_stats: dict
    events: list[dict]
    restart_s: float  # wall seconds the primary stays down after a crash
    first_byte_timeout_s: float  # wall seconds
    final_status: dict | None = None
    folder: Path | None = None
    mitmdump_log: Path | None = None

    @property
    def spike_window(self) -> tuple[float, float]:
        a, b = self.load.spike_window(self.scale)
        return self.t0 + a, self.t0 + b


def served_by(record: Record) -> str | None:
    """'primary', 'fallback', or None for a request the client saw fail."""
    if not record.ok:
        return None
    if record.upstream in ("primary", PRIMARY_MODEL):
        return "primary"
    if record.upstream in ("fallback", FALLBACK_MODEL):
        return "fallback"
    return record.upstream or "unknown"


def down_periods(crash_times: list[float], restart_s: float) -> list[tuple[float, float]]:
    """(crash, back up) per crash: the server is down for the restart time after each crash."""
    periods = []
    for crash in sorted(crash_times):
        if periods and crash < periods[-1][1]:  # cannot crash while down; merge if clocks disagree
            periods[-1] = (periods[-1][0], max(periods[-1][1], crash + restart_s))
        else:
            periods.append((crash, crash + restart_s))
    return periods


def ejection_periods(events: list[dict], upstream: str = "primary", until: float | None = None) -> list[dict]:
    """Each ejection of `upstream`'s nodes: start, end (the return, else start + duration), k, duration.

    `end` is the uneject event's time when there is one (llm-ha logs it on its next tick), otherwise
    the planned end; `until` clips an ejection still running when the run ended.
    """
    periods: list[dict] = []
    open_by_node: dict[str, dict] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("upstream") != upstream:
            continue
        if e["action"] == "eject":
            period = {"node": e["node"], "start": e["ts"], "end": e["ts"] + (e.get("duration_s") or 0.0),
                      "k": e["k"], "duration_s": e.get("duration_s"), "failure_rate": e.get("failure_rate"),
                      "returned": False}
            open_by_node[e["node"]] = period
            periods.append(period)
        elif e["action"] == "uneject" and e["node"] in open_by_node:
            period = open_by_node.pop(e["node"])
            period["end"], period["returned"] = e["ts"], True
    if until is not None:
        for period in periods:
            period["end"] = min(period["end"], max(period["start"], until))
    return periods


def primary_possible(records: list[Record], load: SpikeLoad, scale: float, capacity: float,
                     spike_factor: float = 1.0) -> float:
    """How many of these requests the primary could have served within the first-byte timeout.

    Per phase: the requests that arrived, but at most `capacity` (requests/s, document time) times
    the phase's length. `capacity` is what the primary completes with its first byte in time (see
    `llmbench.bench_spike`'s calibration).
    """
    arrived = Counter(r.phase for r in records)
    total = 0.0
    for phase in load.phases(scale, spike_factor):
        total += min(arrived.get(phase.name, 0), capacity * phase.duration / scale)
    return total


def summarize_run(result: RunResult, capacity: float | None = None) -> dict:
    """The figures of one run (times in ms and s of wall time; `*_doc_s`: in document seconds)."""
    records = result.records
    served = Counter(served_by(r) for r in records)
    ttfts = [r.ttft for r in records if r.ok and r.ttft is not None]
    crashes = list(result.primary_stats.get("crash_times") or [])
    down = down_periods(crashes, result.restart_s)
    down_s = sum(b - a for a, b in down)
    down_in_run_s = sum(max(0.0, min(b, result.t_end) - a) for a, b in down)
    ejections = ejection_periods(result.events, "primary")
    total = len(records)
    ok = sum(r.ok for r in records)
    summary = {
        "variant": result.variant.name,
        "title": result.variant.title,
        "label": result.variant.label or result.variant.title,
        "scale": result.scale,
        "seed": result.seed,
        "requests": total,
        "succeeded": ok,
        "failed": total - ok,
        "failures_by_outcome": dict(Counter(r.outcome for r in records if not r.ok)),
        "by_primary": served.get("primary", 0),
        "by_fallback": served.get("fallback", 0),
        "primary_share": served.get("primary", 0) / total if total else None,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p95_ms": _ms(percentile(ttfts, 95)),
        "ttft_max_ms": _ms(max(ttfts, default=None)),
        "primary_crashes": len(crashes),
        "crash_offsets_s": [round(c - result.t0, 2) for c in crashes],
        "primary_down_s": round(down_s, 2),
        "primary_down_doc_s": round(down_s / result.scale, 1),
        "primary_down_in_run_s": round(down_in_run_s, 2),
        "primary_peak_queue": result.primary_stats.get("peak_queue"),
        "primary_peak_batch": result.primary_stats.get("peak_batch"),
        "ejections": [{"k": e["k"], "duration_s": e["duration_s"], "start_s": round(e["start"] - result.t0, 2),
                       "returned": e["returned"], "failure_rate": e["failure_rate"]} for e in ejections],
        "failovers": sum(1 for e in result.events if e["action"] == "failover"),
        "duration_s": round(result.t_end - result.t0, 2),
    }
    if capacity is not None:
        possible = primary_possible(records, result.load, result.scale, capacity, result.variant.spike_factor)
        summary["capacity_rps"] = capacity
        summary["primary_possible"] = round(possible, 1)
        summary["primary_vs_possible"] = summary["by_primary"] / possible if possible else None
    return summary


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------


def run_scenario(variant: Variant, *, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED,
                 load: SpikeLoad = DEFAULT_LOAD, out_dir: Path | str | None = None, panel: bool = False,
                 terminal: bool = False, confdir: str | None = None,
                 progress: Callable[[str], None] | None = None, settle_s: float | None = None) -> RunResult:
    """Start the processes, run the load, collect, stop everything (also on errors and Ctrl-C).

    `terminal`: mitmdump writes to this process's stdout (for the live panel) instead of a log file.
    `progress`: called with a line now and then (not in `terminal` mode, where mitmdump owns the screen).
    `out_dir`: where this run's profile, event log, mitmdump log, records and stats are written.
    """
    folder = Path(out_dir) if out_dir else DEFAULT_OUT / variant.name
    folder.mkdir(parents=True, exist_ok=True)
    events_path = folder / "events.jsonl"
    events_path.unlink(missing_ok=True)
    say = progress or (lambda line: None)
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(start_simulator(
            "--preset", "primary", "--time-scale", f"{scale:g}", "--seed", str(seed), "--log-level", "WARNING"))
        fallback = stack.enter_context(start_simulator(
            "--preset", "fallback", "--time-scale", f"{scale:g}", "--seed", str(seed), "--log-level", "WARNING"))
        proxy: MitmProcess | None = None
        mitm_log = None
        if variant.proxy:
            profile = folder / "profile.yaml"
            profile.write_text(profile_text(variant, scale, fallback.url))
            mitm_log = folder / "mitmdump.log"
            options = {"llm_ha_events": str(events_path), "flow_detail": 0, "termlog_verbosity": "warn"}
            if panel:
                options["llm_ha_panel"] = True
            proxy = stack.enter_context(_start_proxy(profile, primary.url, options, terminal, confdir, mitm_log))
            target = proxy.url
        else:
            target = primary.url
        phases = load.phases(scale, variant.spike_factor)
        shape = ", ".join(f"{p.name} {p.duration:g} s at {p.rate:g}/s" for p in phases)
        say(f"{variant.title}: {sum(round(p.duration * p.rate) for p in phases)} requests expected over "
            f"{sum(p.duration for p in phases):.0f} s ({shape})")
        t0 = time.time()
        records = asyncio.run(_drive(phases, f"{target}/v1", seed, load.max_tokens, proxy, primary, t0,
                                     say if not terminal else None))
        t_end = time.time()
        # Let llm-ha's ticker log what is due (e.g. a return) and the event log reach the disk.
        time.sleep(settle_s if settle_s is not None else min(1.0, max(0.3, REFERENCE.interval * scale)))
        final_status = None
        if proxy is not None:
            with contextlib.suppress(Exception):
                final_status = proxy.status()
        primary_stats, fallback_stats = primary.stats(), fallback.stats()
    events = _read_events(events_path)
    result = RunResult(variant=variant, scale=scale, seed=seed, load=load, t0=t0, t_end=t_end, records=records,
                       primary_stats=primary_stats, fallback_stats=fallback_stats, events=events,
                       restart_s=REFERENCE.restart_time * scale,
                       first_byte_timeout_s=REFERENCE.first_byte_timeout * scale,
                       final_status=final_status, folder=folder, mitmdump_log=mitm_log)
    _save(result)
    return result


@contextlib.contextmanager
def _start_proxy(profile: Path, reverse: str, options: dict, terminal: bool, confdir: str | None,
                 log_path: Path) -> Iterator[MitmProcess]:
    if not terminal:
        proxy = start_mitmdump(profile, reverse, options=options, confdir=confdir, log_path=str(log_path))
    else:
        proxy = _start_mitmdump_on_terminal(profile, reverse, options, confdir, log_path)
    try:
        yield proxy
    finally:
        proxy.stop()


def _start_mitmdump_on_terminal(profile: Path, reverse: str, options: dict, confdir: str | None,
                                log_path: Path) -> MitmProcess:
    """Like `start_mitmdump`, but mitmdump writes to our terminal (its live panel needs one)."""
    port, status_port = free_port(), free_port()
    settings = {"listen_host": "127.0.0.1", "llm_ha_profile": str(profile),
                "llm_ha_status": f"127.0.0.1:{status_port}", **options}
    if confdir:
        settings["confdir"] = confdir
    command = [*mitmdump_command(), "-p", str(port), "-s", str(ADDON), "--mode", f"reverse:{reverse}"]
    for key, value in settings.items():
        command += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    log_path.write_text("(mitmdump wrote to the terminal)\n")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=REPO)
    proxy = MitmProcess(process, port, status_port, str(log_path))
    _wait_until_up(proxy)
    return proxy


async def _drive(phases: list[Phase], base_url: str, seed: int, max_tokens: int, proxy: MitmProcess | None,
                 primary: SimProcess, t0: float, say: Callable[[str], None] | None) -> list[Record]:
    """Run the load; with `say`, a progress line every few seconds."""
    done: list[Record] = []
    load = asyncio.create_task(run_load(phases, base_url, seed, max_tokens=max_tokens, on_record=done.append))
    if say is None:
        return await load
    every = max(2.0, sum(p.duration for p in phases) / 12)
    while not load.done():
        await asyncio.wait([load], timeout=every)
        if not load.done():
            say(await asyncio.to_thread(_progress_line, done, proxy, primary, t0))
    return await load


def _progress_line(done: list[Record], proxy: MitmProcess | None, primary: SimProcess, t0: float) -> str:
    served = Counter(served_by(r) for r in done)
    parts = [f"t={time.time() - t0:5.1f}s", f"done {len(done)}", f"primary {served.get('primary', 0)}",
             f"fallback {served.get('fallback', 0)}", f"failed {served.get(None, 0)}"]
    with contextlib.suppress(Exception):
        stats = primary.stats()
        state = "DOWN (crashed)" if stats["crashed"] else f"running {stats['running']} queued {stats['queued']}"
        parts.append(f"| primary sim: {state}, crashes {stats['crashes']}")
    if proxy is not None:
        with contextlib.suppress(Exception):
            node = proxy.node("primary")
            left = f" {node['ejected_remaining_s']:.0f}s left" if node["state"] == "ejected" else ""
            parts.append(f"| llm-ha: primary {node['state']}{left} k={node['k']} inflight {node['inflight']}"
                         + (f"/{node['limit']}" if node.get("limit") else ""))
    return " ".join(parts)


def _read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def _save(result: RunResult) -> None:
    if result.folder is None:
        return
    write_records(result.records, str(result.folder / "records.jsonl"))
    (result.folder / "run.json").write_text(json.dumps({
        "variant": asdict(result.variant), "scale": result.scale, "seed": result.seed, "load": asdict(result.load),
        "t0": result.t0, "t_end": result.t_end, "restart_s": result.restart_s,
        "first_byte_timeout_s": result.first_byte_timeout_s, "primary_stats": result.primary_stats,
        "fallback_stats": result.fallback_stats, "final_status": result.final_status,
    }, indent=1, default=str))


def load_result(folder: Path | str) -> RunResult:
    """A saved run back from its folder (records.jsonl, run.json, events.jsonl), e.g. to plot it again."""
    from llmsim.loadgen import read_records

    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    log = folder / "mitmdump.log"
    return RunResult(variant=Variant(**run["variant"]), scale=run["scale"], seed=run["seed"],
                     load=SpikeLoad(**run["load"]), t0=run["t0"], t_end=run["t_end"],
                     records=read_records(str(folder / "records.jsonl")), primary_stats=run["primary_stats"],
                     fallback_stats=run["fallback_stats"], events=_read_events(folder / "events.jsonl"),
                     restart_s=run["restart_s"], first_byte_timeout_s=run["first_byte_timeout_s"],
                     final_status=run.get("final_status"), folder=folder, mitmdump_log=log if log.exists() else None)


def is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
