"""llm-ha against the gateways users would pick instead, on the same spike: `make bench-peers`.

Each gateway (`llmbench.peers`: llm-ha with the reference profile and with limits, mitmdump without
the addon, nginx with the reference's 200 ms and with a practical 1 s read timeout, the LiteLLM
proxy) is put in front of a fresh pair of simulators (the overloadable primary and the cloud fallback, as in
`make bench-spike`) and gets the same seeded open-loop load (`scenario.DEFAULT_LOAD`: steady, a spike
of about three times what the primary serves, steady again), in two runs:

* `spike`: the default spike;
* `primary-dies`: the same load, and the primary is crashed (`POST /_sim/crash`) `--crash-at`
  seconds in, while it carries all the traffic; it stays down for its 180 s restart.

For each run: the failures the client saw, the primary's crashes caused by load, the seconds it was
down within the run, the share of requests it served (the streams it completed), and the time to
first token of the answered requests (p50/p95/p99). Then, with a healthy ideal upstream and no
spike (`overhead`), the same sequential streaming requests as `make bench-overhead`, straight to the
upstream and through each gateway (nginx 1s is left out: the same data path as nginx): time to
first token and its ratio to the direct path, CPU seconds per 1000 requests, and the peak RSS of
each gateway's processes (VmHWM, summed over the process tree). One table is printed;
`out/bench-peers/` gets results.csv, results.md, results.json, bench-peers.png, each run's records
and the gateways' configs and logs. A failure is an error the client got or an answer that ended
cleanly but short (LiteLLM ends a stream broken mid-way with finish_reason "stop").

When llm-ha has the highest added time to first token of the gateways (or with --profile), a
py-spy profile of it under the overhead load is taken (py-spy is installed on demand into
`.venv-pyspy`) and its top functions are printed.

    python -m llmbench.bench_peers [--peers llm-ha,nginx,...] [--scenarios spike,primary-dies] [--scale 1]
                                   [--requests 300] [--quick] [--profile] [--mappings] [--no-install]

The command installs a missing nginx or LiteLLM (`llmbench.peers`) unless `--no-install`; the functions
(`run_spike`, `run_overhead`, `run_all`) only with `install=True`.

Every process it starts is stopped when it ends, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmsim.control import start_simulator
from llmsim.loadgen import DEFAULT_MODEL, Record, percentile, run_load, write_records

from . import peers as peers_mod
from .peers import PEERS, TITLES, PeerUnavailable, Settings, cpu_seconds, start_peer
from .proxy import REPO
from .scenario import DEFAULT_LOAD, DEFAULT_SCALE, DEFAULT_SEED, REFERENCE, SpikeLoad, down_periods

DEFAULT_PEERS = ("llm-ha", "llm-ha-limits", "mitmdump", "nginx", "nginx-1s", "litellm")
SCENARIOS = ("spike", "primary-dies")
DEFAULT_CRASH_AT = 10.0  # document seconds: mid-way through the steady phase before the spike
DEFAULT_OUT = REPO / "out" / "bench-peers"
QUICK_LOAD = SpikeLoad(before_s=2, spike_s=2, after_s=2, max_tokens=16)
QUICK_CRASH_AT = 1.0
PYSPY_VENV = Path(os.environ.get("LLM_HA_PYSPY_VENV", REPO / ".venv-pyspy"))
PYSPY_REQUIREMENT = "py-spy==0.4.3"


@dataclass
class Row:
    """One gateway in one run; absent figures are None."""

    peer: str
    scenario: str  # "spike", "primary-dies" or "overhead"
    requests: int = 0
    failed: int = 0  # errors + truncated
    errors: int = 0  # the client got an error status or a broken stream
    truncated: int = 0  # a clean end (finish_reason, [DONE]) after fewer tokens than the answer has
    failures_by_outcome: dict = field(default_factory=dict)
    primary_crashes: int | None = None  # caused by load (the forced one of primary-dies not counted)
    forced_crashes: int | None = None
    primary_down_s: float | None = None  # wall seconds within the run
    primary_served: int | None = None
    primary_share: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    ttft_p50_ratio: float | None = None  # overhead: to the direct path
    ttft_p95_ratio: float | None = None
    added_ttft_p50_ms: float | None = None
    added_ttft_p95_ms: float | None = None
    cpu_s_per_1000: float | None = None  # the gateway's processes
    cpu_ratio: float | None = None  # (gateway + upstream CPU) / upstream CPU of the direct path
    peak_rss_mib: float | None = None
    duration_s: float | None = None
    error: str | None = None

    @property
    def failed_pct(self) -> float | None:
        return 100 * self.failed / self.requests if self.requests else None


def is_truncated(record: Record, max_tokens: int) -> bool:
    """An answer that ended cleanly with fewer chunks than tokens. The simulators always generate
    `max_tokens` tokens, one chunk each, so a complete answer has max_tokens content chunks and a finish
    chunk; a gateway that ends a broken upstream stream with finish_reason (LiteLLM does) passes less."""
    return record.ok and record.chunks < max_tokens


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- the spike runs

def run_spike(peer: str, scenario: str, *, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED,
              load: SpikeLoad = DEFAULT_LOAD, crash_at: float = DEFAULT_CRASH_AT, out_dir: Path,
              confdir: str | None = None, install: bool = False, say=print) -> Row:
    """One gateway, one run, fresh simulators; every process is stopped before it returns."""
    folder = out_dir / scenario / peer
    folder.mkdir(parents=True, exist_ok=True)
    row = Row(peer, scenario)
    settings = Settings.of(REFERENCE, scale)
    with contextlib.ExitStack() as stack:
        sim_args = ("--time-scale", f"{scale:g}", "--seed", str(seed), "--log-level", "WARNING")
        primary = stack.enter_context(start_simulator("--preset", "primary", *sim_args))
        fallback = stack.enter_context(start_simulator("--preset", "fallback", *sim_args))
        try:
            gateway = stack.enter_context(start_peer(peer, primary.url, fallback.url, settings, folder,
                                                     install=install, confdir=confdir))
        except PeerUnavailable as exc:
            row.error = f"unavailable: {str(exc).splitlines()[0]}"
            return row
        phases = load.phases(scale)
        forced: list[int] = []

        async def drive():
            task = asyncio.create_task(run_load(phases, f"{gateway.url}/v1", seed, max_tokens=load.max_tokens))
            if scenario == "primary-dies":
                await asyncio.sleep(crash_at * scale)
                before = (await asyncio.to_thread(primary.stats))["crashes"]
                await asyncio.to_thread(primary.crash)  # a no-op if the load crashed it already
                forced.append((await asyncio.to_thread(primary.stats))["crashes"] - before)
            return await task

        cpu_before = gateway.cpu_seconds()
        t0 = time.time()
        records = asyncio.run(drive())
        t_end = time.time()
        row.peak_rss_mib = round(gateway.peak_rss_kib() / 1024, 1)
        cpu = gateway.cpu_seconds() - cpu_before
        stats = primary.stats()
    write_records(records, str(folder / "records.jsonl"))
    (folder / "primary-stats.json").write_text(json.dumps(stats, indent=1))
    crashes = list(stats.get("crash_times") or [])
    row.forced_crashes = sum(forced)
    row.primary_crashes = len(crashes) - row.forced_crashes
    restart_s = REFERENCE.restart_time * scale
    row.primary_down_s = round(sum(max(0.0, min(b, t_end) - max(a, t0)) for a, b in down_periods(crashes, restart_s)), 1)
    row.requests = len(records)
    row.errors = sum(not r.ok for r in records)
    row.truncated = sum(is_truncated(r, load.max_tokens) for r in records)
    row.failed = row.errors + row.truncated
    row.failures_by_outcome = dict(Counter("truncated" if is_truncated(r, load.max_tokens) else r.outcome
                                           for r in records if not r.ok or is_truncated(r, load.max_tokens)))
    # Served by the primary: the streams the primary completed (the same for every gateway, whatever
    # headers or model names it passes on; LiteLLM, e.g., names its model group in every chunk).
    row.primary_served = min(stats.get("completed", 0), row.requests - row.failed)
    row.primary_share = row.primary_served / row.requests if row.requests else None
    ttfts = [r.ttft for r in records if r.ok and r.ttft is not None]  # the answered requests
    row.ttft_p50_ms, row.ttft_p95_ms, row.ttft_p99_ms = (_ms(percentile(ttfts, q)) for q in (50, 95, 99))
    row.cpu_s_per_1000 = round(cpu / row.requests * 1000, 2) if row.requests and gateway.pid else None
    row.duration_s = round(t_end - t0, 1)
    return row


# -- the overhead runs

async def measure(base_url: str, requests: int, max_tokens: int) -> list[float | None]:
    """Sequential streaming requests (bench_overhead's way, with the model name every gateway routes):
    the time to the first content chunk of each; None for a request that failed."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-bench", max_retries=0, timeout=30)
    ttfts: list[float | None] = []
    try:
        for _ in range(requests):
            start, first, finished = time.perf_counter(), None, False
            try:
                stream = await client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                    max_tokens=max_tokens)
                async for chunk in stream:
                    choice = chunk.choices[0] if chunk.choices else None
                    if first is None and choice and choice.delta.content:
                        first = time.perf_counter() - start
                    finished = finished or bool(choice and choice.finish_reason)
            except openai.OpenAIError:
                first = None
            ttfts.append(first if finished else None)
    finally:
        await client.close()
    return ttfts


def run_overhead(peers: list[str], *, requests: int = 300, max_tokens: int = 16, out_dir: Path,
                 confdir: str | None = None, install: bool = False, say=print) -> list[Row]:
    """Sequential streaming requests to an ideal upstream, direct and through each gateway."""
    rows = []
    folder = out_dir / "overhead"
    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings.of(REFERENCE, 1.0)
    with (start_simulator("--no-physics", "--log-level", "WARNING") as upstream,
          start_simulator("--preset", "fallback", "--log-level", "WARNING") as fallback):
        direct_cpu = None
        direct_ttft: list[float] = []
        for peer in ["direct", *peers]:
            row = Row(peer, "overhead")
            try:
                with start_peer(peer, upstream.url, fallback.url, settings, folder / peer, install=install,
                                confdir=confdir) as gateway:
                    asyncio.run(measure(gateway.url, min(10, requests), max_tokens))  # warm-up
                    before, upstream_before = gateway.cpu_seconds(), cpu_seconds(upstream.process.pid)
                    completed_before = upstream.stats()["completed"]
                    ttft = asyncio.run(measure(gateway.url, requests, max_tokens))
                    served = upstream.stats()["completed"] - completed_before
                    cpu = gateway.cpu_seconds() - before
                    upstream_cpu = cpu_seconds(upstream.process.pid) - upstream_before
                    row.peak_rss_mib = round(gateway.peak_rss_kib() / 1024, 1) if gateway.pid else None
            except PeerUnavailable as exc:
                row.error = f"unavailable: {str(exc).splitlines()[0]}"
                rows.append(row)
                continue
            except Exception as exc:  # e.g. a request failed: the row says so, the others still run
                row.error = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                continue
            ttft = [t for t in ttft if t is not None]
            row.requests = requests
            row.failed = row.errors = requests - len(ttft)
            if not ttft:
                row.error = "every request failed"
                rows.append(row)
                continue
            row.primary_served = min(served, len(ttft))
            row.primary_share = row.primary_served / requests
            row.ttft_p50_ms, row.ttft_p95_ms, row.ttft_p99_ms = (_ms(percentile(ttft, q)) for q in (50, 95, 99))
            if peer == "direct":
                direct_cpu, direct_ttft = upstream_cpu, ttft
            else:
                row.cpu_s_per_1000 = round(cpu / requests * 1000, 2)
            if direct_ttft:
                d50, d95 = percentile(direct_ttft, 50), percentile(direct_ttft, 95)
                row.ttft_p50_ratio = round(percentile(ttft, 50) / d50, 2)
                row.ttft_p95_ratio = round(percentile(ttft, 95) / d95, 2)
                row.added_ttft_p50_ms = _ms(percentile(ttft, 50) - d50)
                row.added_ttft_p95_ms = _ms(percentile(ttft, 95) - d95)
            if direct_cpu:
                row.cpu_ratio = round((cpu + upstream_cpu) / direct_cpu if peer != "direct" else 1.0, 2)
            rows.append(row)
            say(f"  overhead {peer}: TTFT p50 {row.ttft_p50_ms} ms, CPU {row.cpu_s_per_1000} s/1000 req")
    return rows


# -- profiling llm-ha

def ensure_pyspy() -> Path:
    exe = PYSPY_VENV / "bin" / "py-spy"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(PYSPY_VENV)], check=True, capture_output=True)
    subprocess.run([str(PYSPY_VENV / "bin" / "python"), "-m", "pip", "install", "-q", PYSPY_REQUIREMENT],
                   check=True, capture_output=True)
    return exe


def profile_llm_ha(requests: int, max_tokens: int, out_dir: Path, confdir: str | None, top: int = 15) -> dict:
    """py-spy samples of mitmdump + llm-ha under the overhead load: the functions with the most samples,
    on their own (self) and with what they call (inclusive), as shares of the busy samples."""
    pyspy = ensure_pyspy()
    folder = out_dir / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "llm-ha.pyspy.txt"
    with (start_simulator("--no-physics", "--log-level", "WARNING") as upstream,
          start_simulator("--preset", "fallback", "--log-level", "WARNING") as fallback,
          start_peer("llm-ha", upstream.url, fallback.url, Settings.of(), folder, confdir=confdir) as gateway):
        asyncio.run(measure(gateway.url, 10, max_tokens))
        spy = subprocess.Popen([str(pyspy), "record", "--pid", str(gateway.pid), "--rate", "250", "--format", "raw",
                                "--nolineno", "--output", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(1.0)
            asyncio.run(measure(gateway.url, requests, max_tokens))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(spy.pid, signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait()
    return summarize_profile(raw.read_text() if raw.exists() else "", top)


def summarize_profile(collapsed: str, top: int = 15) -> dict:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed stacks) output."""
    own, inclusive, packages, total, idle = Counter(), Counter(), Counter(), 0, 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames[-1].startswith("selectors.py:") and frames[-1].rsplit(".", 1)[-1].endswith("select"):
            idle += n  # waiting in epoll: the event loop has nothing to do
            continue
        total += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return {"samples": 0, "idle_samples": idle, "self": [], "inclusive": [], "packages": [], "llm_ha": []}
    return {
        "samples": total,
        "idle_samples": idle,
        "self": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top * 3)
                      if not _is_frame_of_the_loop(name)][:top],
        "packages": [(name, round(100 * n / total, 1)) for name, n in packages.most_common()],
        "llm_ha": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common()
                   if name.startswith("llmha/")][:top],
    }


def _package(name: str) -> str:
    """The package a frame belongs to, for the 'where does the time go' breakdown."""
    path = name.split(":", 1)[0]
    if path.startswith("llmha/"):
        return "llm-ha (addons/llmha)"
    head = path.split("/", 1)[0]
    if "/" not in path:
        head = path.removesuffix(".py")
    return {"httpcore": "httpx/httpcore", "httpx": "httpx/httpcore", "anyio": "httpx/httpcore"}.get(head, head)


def _frame_name(frame: str) -> str:
    """'handle (mitmproxy/proxy/server.py)' -> 'mitmproxy/proxy/server.py:handle'."""
    m = re.match(r"(.*?) \((.*)\)$", frame.strip())
    if not m:
        return frame.strip()
    function, filename = m.groups()
    filename = re.sub(r".*site-packages/", "", filename)
    filename = re.sub(r"^(.*/)?llmha/", "llmha/", filename)
    filename = re.sub(r".*/lib/python3\.\d+/", "", filename)
    return f"{filename}:{function}"


def _is_frame_of_the_loop(name: str) -> bool:
    """Frames every sample passes through (the entry point and the event loop): no information."""
    return (name.endswith(("<module>", ".run_forever", ".run_until_complete", "._run_once", "Handle._run"))
            or any(part in name for part in ("asyncio/runners.py", "mitmproxy/tools/main.py", "mitmproxy/master.py:Master.run",
                                             "mitmdump:")))


# -- the report

def _fmt(value, spec: str = "g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


SHORT = {"direct": "direct", "llm-ha": "llm-ha", "llm-ha-limits": "llm-ha+limits", "llm-ha-resume": "llm-ha+resume",
         "mitmdump": "mitmdump",
         "nginx": "nginx 200ms", "nginx-1s": "nginx 1s", "litellm": "LiteLLM"}
SCENARIO_TITLES = {"spike": "default spike", "primary-dies": "primary dies", "overhead": "healthy, no spike"}


HEADERS = ("gateway", "run", "requests", "client failures", "primary crashes", "primary down s",
           "served by primary", "TTFT p50/p95/p99 ms", "added TTFT p50/p95 (x direct)", "CPU s/1k req (x direct)",
           "peak RSS MiB")


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name in HEADERS:
        t.add_column(name, justify="left" if name in ("gateway", "run") else "right")
    previous = None
    for row in rows:
        if previous is not None and row.scenario != previous:
            t.add_section()
        previous = row.scenario
        cells = cells_of(row)
        t.add_row(*cells, style="dim" if row.error else None)
    return t


def markdown(rows: list[Row]) -> str:
    """The same table in Markdown, for the README."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADERS))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells_of(row)) + " |")
    return "\n".join(lines) + "\n"


def cells_of(row: Row) -> list[str]:
    name = SHORT.get(row.peer, row.peer)
    if row.error:
        return [name, SCENARIO_TITLES[row.scenario], "-", row.error.splitlines()[0][:70], *[""] * 7]
    failures = f"{row.failed} ({row.failed_pct:.1f}%)"
    if row.truncated:
        failures += f" ({row.truncated} truncated)"
    added = "-"
    if row.peer == "direct":
        added = "+0/+0 ms (1.00x/1.00x)"
    elif row.ttft_p50_ratio is not None:
        added = (f"{row.added_ttft_p50_ms:+.1f}/{row.added_ttft_p95_ms:+.1f} ms "
                 f"({row.ttft_p50_ratio:.2f}x/{row.ttft_p95_ratio:.2f}x)")
    cpu = "-"
    if row.cpu_s_per_1000 is not None:
        cpu = f"{row.cpu_s_per_1000:.2f}" + (f" ({row.cpu_ratio:.2f}x)" if row.cpu_ratio is not None else "")
    elif row.peer == "direct" and row.scenario == "overhead":
        cpu = "- (1.00x)"
    crashes = _fmt(row.primary_crashes)
    if row.forced_crashes:
        crashes += f" (+{row.forced_crashes} forced)"
    ttft = "/".join(_fmt(v, ".0f" if (v or 0) >= 100 else ".1f") for v in
                      (row.ttft_p50_ms, row.ttft_p95_ms, row.ttft_p99_ms))
    share = None if row.primary_share is None else 100 * row.primary_share
    return [name, SCENARIO_TITLES[row.scenario], str(row.requests), failures, crashes, _fmt(row.primary_down_s, ".0f"),
            _fmt(share, ".1f", "%"), ttft, added, cpu, _fmt(row.peak_rss_mib, ".0f")]


def targets(rows: list[Row], mine: str = "llm-ha") -> list[tuple[str, bool | None, str]]:
    """llm-ha's targets against the other gateways (not its own variants): (what, met or None for n/a, figures)."""
    checks: list[tuple[str, bool | None, str]] = []
    label = SHORT.get(mine, mine)
    for scenario in SCENARIOS:
        runs = [r for r in rows if r.scenario == scenario and not r.error
                and (r.peer == mine or not r.peer.startswith("llm-ha"))]
        me = next((r for r in runs if r.peer == mine), None)
        if me is None:
            continue
        fewest = min(r.failed for r in runs)
        checks.append((f"{label}, {scenario}: fewest client failures", me.failed <= fewest,
                       ", ".join(f"{r.peer} {r.failed}" for r in runs)))
        if scenario == "spike":
            checks.append((f"{label}, spike: zero client failures", me.failed == 0, f"{mine} {me.failed}"))
        checks.append((f"{label}, {scenario}: zero primary crashes", me.primary_crashes == 0,
                       f"{mine} {me.primary_crashes}"))
        clean = [r for r in runs if r.failed == 0]
        what = f"{label}, {scenario}: highest primary share among runs without failures"
        shares = ", ".join(f"{r.peer} {100 * (r.primary_share or 0):.1f}% ({r.failed} failed)" for r in runs)
        if not clean:
            checks.append((what, None, "n/a, no run without failures: " + shares))
        else:
            best = max(r.primary_share or 0 for r in clean)
            checks.append((what, me.failed == 0 and (me.primary_share or 0) >= best - 1e-9, shares))
    return checks


def slowest_gateway(rows: list[Row]) -> str | None:
    over = [r for r in rows if r.scenario == "overhead" and r.peer != "direct" and r.ttft_p50_ms is not None]
    return max(over, key=lambda r: r.ttft_p50_ms).peer if over else None


def write_csv(rows: list[Row], path: Path) -> None:
    names = [f for f in Row.__dataclass_fields__ if f != "failures_by_outcome"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["title", *names, "failed_pct", "failures_by_outcome"])
        for row in rows:
            data = asdict(row)
            writer.writerow([TITLES.get(row.peer, row.peer), *[data[n] for n in names],
                             None if row.failed_pct is None else round(row.failed_pct, 2),
                             json.dumps(row.failures_by_outcome)])


def write_png(rows: list[Row], path: Path, subtitle: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    peers = list(dict.fromkeys(r.peer for r in rows if r.peer != "direct"))
    colors = {p: c for p, c in zip(peers, ["#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#264653", "#8ab17d", "#6d597a"])}
    panels = [
        ("client failures (%)", [("spike", lambda r: r.failed_pct), ("primary-dies", lambda r: r.failed_pct)]),
        ("primary crashes (by load)", [("spike", lambda r: r.primary_crashes), ("primary-dies", lambda r: r.primary_crashes)]),
        ("served by the primary (%)", [("spike", lambda r: None if r.primary_share is None else 100 * r.primary_share),
                                       ("primary-dies", lambda r: None if r.primary_share is None else 100 * r.primary_share)]),
        ("TTFT p95 (ms), answered requests", [("spike", lambda r: r.ttft_p95_ms), ("primary-dies", lambda r: r.ttft_p95_ms)]),
        ("added TTFT p50 (ms), healthy", [("overhead", lambda r: r.added_ttft_p50_ms)]),
        ("CPU s / 1000 req, healthy", [("overhead", lambda r: r.cpu_s_per_1000)]),
        ("peak RSS (MiB), spike run", [("spike", lambda r: r.peak_rss_mib)]),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, series) in zip(axes.flat, panels):
        width = 0.8 / max(1, len(peers))
        for i, peer in enumerate(peers):
            values = []
            for scenario, get in series:
                row = next((r for r in rows if r.peer == peer and r.scenario == scenario and not r.error), None)
                value = get(row) if row else None
                values.append(float("nan") if value is None else value)
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(series))]
            bars = ax.bar(xs, values, width, label=TITLES.get(peer, peer), color=colors[peer])
            ax.bar_label(bars, labels=["" if v != v else f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}".rstrip("0").rstrip(".")
                                       for v in values], fontsize=7, padding=1)
        ax.set_xticks(range(len(series)), [SCENARIO_TITLES[s] for s, _ in series])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=10)
    fig.suptitle(f"llm-ha and the gateways users would pick instead  ({subtitle})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}"


def versions() -> str:
    parts = []
    with contextlib.suppress(Exception):
        import mitmproxy.version
        parts.append(f"mitmproxy {mitmproxy.version.VERSION}")
    nginx = peers_mod.nginx_binary()
    if nginx:
        with contextlib.suppress(Exception):
            out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=5)
            parts.append((out.stderr or out.stdout).strip().replace("nginx version: ", ""))
    parts.append(f"litellm {peers_mod.LITELLM_VERSION}")
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        if head:
            parts.append(f"llm-ha {head}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


# -- main

def run_all(peers: list[str], scenarios: list[str], *, scale: float, seed: int, load: SpikeLoad, crash_at: float,
            requests: int, max_tokens: int, out_dir: Path, install: bool = False, overhead_peers: list[str] | None = None,
            say=print) -> list[Row]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llm-ha-bench-peers-") as confdir:
        for scenario in scenarios:
            for peer in peers:
                say(f"{scenario}: {TITLES.get(peer, peer)} ...")
                try:
                    row = run_spike(peer, scenario, scale=scale, seed=seed, load=load, crash_at=crash_at,
                                    out_dir=out_dir, confdir=confdir, install=install, say=say)
                except Exception as exc:  # the run is reported as failed; the others still run
                    row = Row(peer, scenario, error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                summary = (f"{row.failed}/{row.requests} failed, primary crashes {row.primary_crashes}, "
                           f"served by primary {100 * (row.primary_share or 0):.1f}%, TTFT p95 {row.ttft_p95_ms} ms")
                say(f"  {row.error or summary}")
        if requests > 0:
            over = overhead_peers if overhead_peers is not None else [p for p in peers if p != "nginx-1s"]
            say("overhead: healthy ideal upstream, sequential streaming requests ...")
            rows.extend(run_overhead(over, requests=requests, max_tokens=max_tokens, out_dir=out_dir,
                                     confdir=confdir, install=install, say=say))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmbench.bench_peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from spike, primary-dies")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="time scale of the spike runs (simulators, load, every configured duration)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--crash-at", type=float, default=DEFAULT_CRASH_AT,
                   help="primary-dies: document seconds after the load's start when the primary is crashed")
    p.add_argument("--requests", type=int, default=300, help="overhead: sequential requests per path (0: skip)")
    p.add_argument("--max-tokens", type=int, default=16, help="overhead: tokens per answer")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for results.csv, results.json, bench-peers.png")
    p.add_argument("--no-install", action="store_true", help="do not install missing peers (they are skipped)")
    p.add_argument("--no-profile", action="store_true", help="no py-spy profile even if llm-ha is the slowest")
    p.add_argument("--profile", action="store_true", help="profile llm-ha with py-spy even if it is not the slowest")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds per run (2 s steady, 2 s spike, 2 s steady, crash at 1 s, 20 requests): "
                        "to check the harness, not to measure")
    p.add_argument("--mappings", action="store_true", help="print how the reference settings map onto each peer, and exit")
    return p.parse_args(argv)


def mappings_table() -> Table:
    t = Table(title="The reference profile in each gateway", title_justify="left", show_lines=True)
    for name in ("reference (llm-ha takes it as is)", "nginx", "LiteLLM proxy"):
        t.add_column(name, overflow="fold")
    for setting, nginx, litellm in peers_mod.MAPPINGS:
        t.add_row(escape(setting), escape(nginx), escape(litellm))
    return t


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=max(210, Console().width))
    if args.mappings:
        console.print(mappings_table())
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every process
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [p for p in peers if p not in PEERS] + [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        sys.exit(f"bench-peers: unknown peer or scenario {unknown[0]!r}")
    out_dir = Path(args.out)
    when = time.strftime("%Y-%m-%d %H:%M")
    load = DEFAULT_LOAD
    if args.quick:
        load = QUICK_LOAD
        args.crash_at, args.requests = QUICK_CRASH_AT, min(args.requests, 20)

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    say(f"bench-peers {when}, {machine()}; {versions()}")
    say(f"load: {load.before_s:g} s at {load.steady_rate:g}/s, {load.spike_s:g} s at {load.spike_rate:g}/s, "
        f"{load.after_s:g} s at {load.steady_rate:g}/s, {load.max_tokens} tokens per answer, seed {args.seed}, "
        f"time scale {args.scale:g}; primary-dies: crash at {args.crash_at:g} s")
    started = time.monotonic()
    try:
        rows = run_all(peers, scenarios, scale=args.scale, seed=args.seed, load=load, crash_at=args.crash_at,
                       requests=args.requests, max_tokens=args.max_tokens, out_dir=out_dir,
                       install=not args.no_install, say=say)
    finally:
        peers_mod.stop_all()
    subtitle = f"{when}, {machine()}"
    console.print(table(rows, f"bench-peers: {subtitle}"))
    say("gateways: " + "; ".join(f"{SHORT[p]} = {TITLES[p]}" for p in ["direct", *peers] if p in SHORT)
        + ". Failures: errors + answers that ended cleanly but truncated. TTFT: answered requests. "
          "CPU: the gateway's processes; (x): gateway + upstream CPU over the upstream's CPU going direct. "
          "RSS: VmHWM summed over the gateway's processes.")
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "results.md").write_text(f"bench-peers, {subtitle}; {versions()}\n\n" + markdown(rows))
    png = write_png(rows, out_dir / "bench-peers.png", subtitle)
    result = {"date": when, "machine": machine(), "versions": versions(), "scale": args.scale, "seed": args.seed,
              "crash_at": args.crash_at, "load": asdict(load), "rows": [asdict(r) for r in rows],
              "mappings": peers_mod.MAPPINGS}
    checks = targets(rows) + (targets(rows, "llm-ha-limits") if "llm-ha-limits" in peers else [])
    for what, met, detail in checks:
        say(f"{'n/a    ' if met is None else 'MET    ' if met else 'NOT MET'} {what}: {detail}")
    result["targets"] = checks
    slowest = slowest_gateway(rows)
    if args.requests > 0 and not args.no_profile and (slowest == "llm-ha" or args.profile):
        say(("llm-ha has the highest added TTFT of the gateways" if slowest == "llm-ha" else "--profile")
            + ": profiling llm-ha with py-spy under the overhead load ...")
        try:
            prof = profile_llm_ha(args.requests, args.max_tokens, out_dir, None)
            result["profile"] = prof
            say(f"py-spy, {prof['samples']} busy samples of mitmdump + llm-ha ({prof['idle_samples']} more waiting "
                f"in epoll, left out); top functions by own time:")
            for name, share in prof["self"]:
                say(f"  {share:5.1f}%  {name}")
            say("by inclusive time (with what they call):")
            for name, share in prof["inclusive"]:
                say(f"  {share:5.1f}%  {name}")
            say("llm-ha's own functions, inclusive:")
            for name, share in prof["llm_ha"]:
                say(f"  {share:5.1f}%  {name}")
            say("by package of the running function: " + ", ".join(f"{n} {v:.0f}%" for n, v in prof["packages"][:10]))
        except Exception as exc:
            say(f"profile failed: {type(exc).__name__}: {exc}")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    say(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}"
        + (f", {out_dir / 'bench-peers.png'}" if png else " (no PNG: matplotlib missing)")
        + f" in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
