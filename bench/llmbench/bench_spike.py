"""The source document's spike, run several ways on this machine: `make bench-spike`.

The same seeded open-loop load (`llmbench.scenario.SpikeLoad`: steady, a spike of about three times the
primary's capacity, steady) is sent

1. `none`: straight to the primary simulator, no protection;
2. `no-failover`: through llm-ha with `transparent_failover: false` (one attempt per request, fail fast
   at the first-byte timeout, ejection, the fallback only for new requests: the document's behaviour);
3. `llm-ha`: through llm-ha as built (a late first byte is retried on the fallback before the client
   sees anything; ejection);
4. `limits`: llm-ha with the primary's concurrency limited (`max_inflight: 16`, `adaptive: true`,
   `min_inflight: 2`, `slow_start`);
5. `limits-2x`: the same on a spike twice as large;
6. `fixed-cap`: llm-ha with a fixed cap of 16 in flight (not adaptive), for comparison with 4.

and one table is printed: client-visible failures, primary crashes, seconds the primary was down,
the share served by the primary, time to first token (p50/p95); and for the limited runs, what the
primary served compared with what it could have served within the first-byte timeout.

That capacity is measured first (`calibrate`): the primary simulator alone, closed loop, with 12, 16
and 20 requests kept in flight; the capacity is the highest completion rate among those levels whose
p95 time to first token stays within the first-byte timeout. Per phase of the load, the primary could
have served min(requests that arrived, capacity x the phase's length).

Time scale: see `llmbench.scenario`. By default the spike twice as large runs with time twice as slow
(time scale x 2): it is the same experiment in the document's time (physics, profile and load all
scale together), but the proxy sees the same number of requests per wall-clock second as in the other
runs; this machine's two cores cannot carry mitmdump, the simulators and the load generator at twice
that rate without the proxy's event loop lagging past the first-byte timeout, which would measure the
machine, not llm-ha. `--same-scale` runs it at the common scale anyway.

    python -m llmbench.bench_spike [--seed 7] [--scale 1] [--only llm-ha --only limits] [--out out/bench-spike]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from rich.console import Console
from rich.table import Table

from llmsim.control import start_simulator
from llmsim.loadgen import Record, percentile, prompt_for, send_one
from llmsim.server import PRIMARY as PRIMARY_PHYSICS

from .scenario import (
    DEFAULT_LOAD,
    DEFAULT_OUT,
    DEFAULT_SCALE,
    DEFAULT_SEED,
    PRIMARY_MODEL,
    REFERENCE,
    VARIANTS,
    RunResult,
    SpikeLoad,
    Variant,
    describe_scale,
    estimated_capacity,
    run_scenario,
    selected_runs,
    summarize_run,
)

CALIBRATION_LEVELS = (12, 16, 20)
TARGET_SHARE = 0.90


# ---------------------------------------------------------------------------------------------------
# Capacity within the first-byte timeout
# ---------------------------------------------------------------------------------------------------


@dataclass
class Level:
    inflight: int
    throughput: float  # completed requests per second, document time
    ttft_p50_ms: float | None  # document milliseconds
    ttft_p95_ms: float | None
    completed: int
    failed: int


@dataclass
class Calibration:
    levels: list[Level]
    capacity: float  # requests/s, document time
    timeout_ms: float
    estimate: float  # from the physics
    how: str


async def _closed_loop(base_url: str, inflight: int, warm_s: float, window_s: float, max_tokens: int,
                       stagger_s: float) -> Level:
    """`inflight` workers each sending the next request when the last one ends; measured after `warm_s`.

    Worker i starts `i * stagger_s` late: every answer takes the same number of steps, so workers
    started together would stay in lock step, be admitted together, and wait for each other's prefill.
    """
    client = openai.AsyncOpenAI(base_url=base_url, api_key="calibration", max_retries=0, timeout=60)
    start = time.time()
    measure_from, stop_at = start + warm_s, start + warm_s + window_s
    records: list[Record] = []
    ids = iter(range(10**9))

    async def worker(i: int) -> None:
        await asyncio.sleep(i * stagger_s)
        while time.time() < stop_at:
            i = next(ids)
            record = Record(id=i, phase="calibration", scheduled=time.time(), start=time.time())
            await send_one(client, record, PRIMARY_MODEL, max_tokens, prompt_for(i, 20))
            records.append(record)

    try:
        await asyncio.gather(*(worker(i) for i in range(inflight)))
    finally:
        await client.close()
    done = [r for r in records if r.ok and r.end is not None and measure_from <= r.end <= stop_at]
    started = [r.ttft for r in records if r.ok and r.ttft is not None and r.start >= measure_from]
    failed = sum(not r.ok for r in records)
    return Level(inflight, len(done) / window_s, _ms(percentile(started, 50)), _ms(percentile(started, 95)),
                 len(done), failed)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def calibrate(scale: float, load: SpikeLoad = DEFAULT_LOAD, levels=CALIBRATION_LEVELS, warm_doc_s: float = 5.0,
              window_doc_s: float = 10.0, say=print) -> Calibration:
    """Measure what the primary completes with its first token within the first-byte timeout."""
    timeout_ms = REFERENCE.first_byte_timeout * 1000
    measured = []
    with start_simulator("--preset", "primary", "--time-scale", f"{scale:g}", "--log-level", "WARNING") as primary:
        for n in levels:
            service = load.max_tokens * PRIMARY_PHYSICS.step_time(min(n, PRIMARY_PHYSICS.max_batch))
            level = asyncio.run(_closed_loop(f"{primary.url}/v1", n, warm_doc_s * scale, window_doc_s * scale,
                                             load.max_tokens, service / n * scale))
            # back to document time
            level.throughput *= scale
            level.ttft_p50_ms = None if level.ttft_p50_ms is None else level.ttft_p50_ms / scale
            level.ttft_p95_ms = None if level.ttft_p95_ms is None else level.ttft_p95_ms / scale
            measured.append(level)
            say(f"  calibration: {n} in flight: {level.throughput:.2f} requests/s, TTFT p50 "
                f"{_fmt(level.ttft_p50_ms)} ms, p95 {_fmt(level.ttft_p95_ms)} ms, {level.failed} failed")
        crashed = primary.stats()["crashes"]
    within = [lv for lv in measured if lv.ttft_p95_ms is not None and lv.ttft_p95_ms <= timeout_ms and not lv.failed]
    estimate = estimated_capacity(load.max_tokens)
    if within and not crashed:
        best = max(within, key=lambda lv: lv.throughput)
        how = (f"measured: the primary alone, closed loop, {best.inflight} requests in flight, "
               f"{best.throughput:.2f} requests/s with TTFT p95 {best.ttft_p95_ms:.0f} ms <= {timeout_ms:.0f} ms "
               f"(physics estimate at a full batch: {estimate:.2f})")
        return Calibration(measured, best.throughput, timeout_ms, estimate, how)
    how = f"no level stayed within the timeout; using the physics estimate {estimate:.2f} requests/s"
    return Calibration(measured, estimate, timeout_ms, estimate, how)


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

COLUMNS = [
    ("run", "run"),
    ("scale", "time\nscale"),
    ("requests", "requests"),
    ("failed", "client-visible\nfailures"),
    ("primary_crashes", "primary\ncrashes"),
    ("primary_down_doc_s", "primary\ndown (s)"),
    ("primary_share", "served by\nprimary"),
    ("ttft_p50_ms", "TTFT\np50 (ms)"),
    ("ttft_p95_ms", "TTFT\np95 (ms)"),
    ("ejections_text", "ejections\nk: s"),
    ("primary_vs_possible", "primary vs what it\ncan serve in time"),
]


def row_values(index: int, s: dict) -> dict:
    """One row's cells as text; times in the document's seconds and milliseconds."""
    scale = s["scale"]

    def ms(value):
        return "-" if value is None else f"{value / scale:.0f}"

    ejections = ", ".join(f"{e['k']}: {e['duration_s'] / scale:g}" for e in s["ejections"]) or "-"
    vs = s.get("primary_vs_possible")
    return {
        "run": f"({index}) {s.get('label') or s['title']}",
        "scale": f"{scale:g}",
        "requests": str(s["requests"]),
        "failed": str(s["failed"]),
        "primary_crashes": str(s["primary_crashes"]),
        "primary_down_doc_s": f"{s['primary_down_doc_s']:g}",
        "primary_share": "-" if s["primary_share"] is None else f"{100 * s['primary_share']:.1f} %",
        "ttft_p50_ms": ms(s["ttft_p50_ms"]),
        "ttft_p95_ms": ms(s["ttft_p95_ms"]),
        "ejections_text": ejections,
        "primary_vs_possible": "-" if vs is None else
        f"{100 * vs:.0f} % ({s['by_primary']} of {s['primary_possible']:.0f})",
    }


def build_table(summaries: list[tuple[int, dict]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for key, header in COLUMNS:
        table.add_column(header, justify="left" if key == "run" else "right", no_wrap=key == "run")
    for index, s in summaries:
        cells = row_values(index, s)
        table.add_row(*(cells[key] for key, _ in COLUMNS))
    return table


def write_csv(summaries: list[tuple[int, dict]], path: Path) -> None:
    fields = ["index", "variant", "title", "scale", "seed", "requests", "succeeded", "failed", "by_primary",
              "by_fallback", "primary_share", "ttft_p50_doc_ms", "ttft_p95_doc_ms", "primary_crashes",
              "primary_down_doc_s", "ejections", "failovers", "capacity_rps", "primary_possible",
              "primary_vs_possible", "failures_by_outcome"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for index, s in summaries:
            scale = s["scale"]
            writer.writerow({
                "index": index, "variant": s["variant"], "title": s["title"], "scale": scale, "seed": s["seed"],
                "requests": s["requests"], "succeeded": s["succeeded"], "failed": s["failed"],
                "by_primary": s["by_primary"], "by_fallback": s["by_fallback"],
                "primary_share": _round(s["primary_share"], 4),
                "ttft_p50_doc_ms": _round(s["ttft_p50_ms"] and s["ttft_p50_ms"] / scale, 1),
                "ttft_p95_doc_ms": _round(s["ttft_p95_ms"] and s["ttft_p95_ms"] / scale, 1),
                "primary_crashes": s["primary_crashes"], "primary_down_doc_s": s["primary_down_doc_s"],
                "ejections": " ".join(f"k{e['k']}:{e['duration_s'] / scale:g}s" for e in s["ejections"]),
                "failovers": s["failovers"], "capacity_rps": _round(s.get("capacity_rps"), 3),
                "primary_possible": s.get("primary_possible"),
                "primary_vs_possible": _round(s.get("primary_vs_possible"), 4),
                "failures_by_outcome": json.dumps(s["failures_by_outcome"]),
            })


def _round(value, digits):
    return None if value is None else round(value, digits)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def verdicts(by_name: dict[str, dict]) -> list[str]:
    """The targets, checked against what was measured; a missed target says what it measured."""
    lines = []
    if "llm-ha" in by_name:
        s = by_name["llm-ha"]
        crash_none = by_name.get("none", {}).get("primary_crashes")
        ok = s["failed"] == 0 and s["primary_crashes"] == 0 and (crash_none is None or crash_none > 0)
        lines.append(f"{'MET' if ok else 'MISSED'}: (3) llm-ha: {s['failed']} client-visible failures, "
                     f"{s['primary_crashes']} primary crashes"
                     + ("" if crash_none is None else f", while without protection the primary crashed {crash_none}x"))
    for name in ("limits", "limits-2x", "fixed-cap"):
        if name not in by_name:
            continue
        s = by_name[name]
        vs = s.get("primary_vs_possible")
        ok = s["failed"] == 0 and s["primary_crashes"] == 0 and vs is not None and vs >= TARGET_SHARE
        peak = s.get("primary_peak_batch")
        lines.append(f"{'MET' if ok else 'MISSED'}: {s['title']}: {s['failed']} failures, {s['primary_crashes']} "
                     f"crashes, primary served {s['by_primary']} of the {s.get('primary_possible', 0):.0f} it could "
                     f"serve within the timeout ({_pct(vs)}; target >= {TARGET_SHARE:.0%})"
                     + ("" if peak is None else f"; it never ran more than {peak} at once (its batch holds 16)"))
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmbench.bench_spike", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="runs: " + ", ".join(f"{v.name} ({v.title})" for v in VARIANTS.values()))
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the load's arrivals; default {DEFAULT_SEED}")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help=f"time scale (the simulators' --time-scale; < 1 runs faster); default {DEFAULT_SCALE:g}")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this one (repeat, or NAME,NAME); names: " + ", ".join(VARIANTS))
    p.add_argument("--same-scale", action="store_true",
                   help="run the spike twice as large at the common time scale too (default: time twice as slow)")
    p.add_argument("--capacity", type=float,
                   help="the primary's capacity in requests/s (document time); skips the calibration")
    p.add_argument("--no-plots", action="store_true", help="no PNG timeline per run")
    p.add_argument("--out", default=str(DEFAULT_OUT / "bench-spike"), help="output folder; default out/bench-spike")
    args = p.parse_args(argv)
    names = selected_runs(p, args.only, VARIANTS)
    if args.scale <= 0:
        p.error("--scale must be positive")
    args.names = names or list(VARIANTS)
    return args


def run_scale(variant: Variant, scale: float, same_scale: bool) -> float:
    return scale if same_scale else scale * max(1.0, variant.spike_factor)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=180)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = DEFAULT_LOAD
    started = time.monotonic()
    console.print(f"[bold]bench-spike[/bold]: seed {args.seed}; {describe_scale(args.scale)}")
    console.print(f"load (document time): {load.before_s:g} s at {load.steady_rate:g}/s, spike {load.spike_s:g} s at "
                  f"{load.spike_rate:g}/s, {load.after_s:g} s at {load.steady_rate:g}/s; answers of {load.max_tokens} "
                  f"tokens (the primary's physics estimate: {estimated_capacity(load.max_tokens):.2f} requests/s at "
                  f"its full batch)")
    capacity = args.capacity
    calibration = None
    if capacity is None and any(VARIANTS[n].limits for n in args.names):
        console.print("measuring what the primary serves within the first-byte timeout (the primary alone, closed loop):")
        calibration = calibrate(args.scale, load, say=console.print)
        capacity = calibration.capacity
        console.print(f"  capacity: {capacity:.2f} requests/s ({calibration.how})")
    summaries: list[tuple[int, dict]] = []
    index_of = {name: i + 1 for i, name in enumerate(VARIANTS)}
    try:
        for name in args.names:
            variant = VARIANTS[name]
            scale = run_scale(variant, args.scale, args.same_scale)
            note = "" if scale == args.scale else f" (time scale {scale:g}: {describe_scale(scale)})"
            console.print(f"[bold]({index_of[name]}) {variant.title}[/bold]{note}")
            result = run_scenario(variant, scale=scale, seed=args.seed, load=load, out_dir=out / name,
                                  confdir=str(out / ".mitmproxy"),
                                  progress=lambda line: console.print("  " + line, soft_wrap=True, highlight=False))
            summary = summarize_run(result, capacity if variant.limits else None)
            summaries.append((index_of[name], summary))
            (out / name / "summary.json").write_text(json.dumps(summary, indent=1))
            console.print(f"  {summary['failed']} failed, {summary['primary_crashes']} primary crashes, "
                          f"{summary['by_primary']} by the primary, {summary['by_fallback']} by the fallback")
            if not args.no_plots:
                _plot(result, out / name / "timeline.png", console)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]; the runs so far:")
    if not summaries:
        sys.exit(1)
    title = (f"bench-spike, seed {args.seed}: times in the document's seconds (TTFT as measured by the client, "
             f"divided by the time scale)")
    console.print(build_table(summaries, title))
    if calibration:
        console.print(f"primary vs capacity: requests the primary served / what it could serve within the "
                      f"{calibration.timeout_ms:.0f} ms first-byte timeout, per phase min(arrived, "
                      f"{calibration.capacity:.2f}/s x length); capacity {calibration.how}")
    elif capacity:
        console.print(f"primary vs capacity: with the given capacity {capacity:.2f} requests/s")
    console.print("primary down: the restart time after each crash (the 180 s of the document), whether or not "
                  "the run lasted that long")
    for line in verdicts({s["variant"]: s for _, s in summaries}):
        console.print(("[green]" if line.startswith("MET") else "[red]") + line + "[/]")
    csv_path = out / "bench-spike.csv"
    write_csv(summaries, csv_path)
    console.print(f"CSV: {csv_path}  (runs' records, events, profiles, logs and timelines: {out}/<run>/); "
                  f"took {time.monotonic() - started:.0f} s")


def _plot(result: RunResult, path: Path, console: Console) -> None:
    try:
        from .timeline import PlotUnavailable, write_timeline
    except ImportError as exc:  # pragma: no cover
        console.print(f"  no timeline: {exc}")
        return
    try:
        write_timeline(result, path)
        console.print(f"  timeline: {path}")
    except PlotUnavailable as exc:
        console.print(f"  {exc}")


if __name__ == "__main__":
    main()
