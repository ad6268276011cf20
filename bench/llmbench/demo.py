"""`make demo`: the source document's traffic spike, with llm-ha in front of the overloadable primary.

Starts the primary simulator (DeepSeek-R1-Distill-Qwen-7B on one A10: queues, slows down, runs out of
GPU memory and restarts for 180 s), the fallback simulator (qwen-plus at a cloud provider) and mitmdump
with llm-ha (the live panel on) in reverse mode in front of the primary; sends a seeded open-loop load:
steady, a spike of about three times what the primary can serve, steady again. Then prints a summary
and writes a PNG timeline (after the document's figure 13) to out/demo/timeline.png.

What to watch: the time to first token climbs with the spike, attempts pass the first-byte timeout
and are retried on the fallback before the client sees a byte, the failure rate passes 50 %, llm-ha
ejects the primary for 30 s (k=1) and the fallback serves everything; the primary returns, serves the
steady load again, and never crashes. `make bench-spike` runs the same load without protection (the
primary crashes) and the other configurations.

    python -m llmbench.demo [--scale 1] [--seed 7] [--out out] [--no-panel]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .scenario import (
    DEFAULT_LOAD,
    DEFAULT_OUT,
    DEFAULT_SCALE,
    DEFAULT_SEED,
    REFERENCE,
    VARIANTS,
    describe_scale,
    estimated_capacity,
    is_terminal,
    run_scenario,
    summarize_run,
)

DEMO_VARIANT = "llm-ha"


def summary_table(summary: dict) -> Table:
    """The demo's summary: counts, TTFT, crashes and ejections (times as they passed on the wall clock)."""
    scale = summary["scale"]
    table = Table(title=f"llm-ha demo: the traffic spike ({summary['title']})", title_justify="left",
                  show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    total = summary["requests"] or 1
    failed = summary["failed"]
    table.add_row("requests sent", str(summary["requests"]), "open loop, seeded")
    table.add_row("succeeded", str(summary["succeeded"]), "")
    table.add_row("failed (client-visible)", f"[{'green' if failed == 0 else 'red'}]{failed}[/]",
                  ", ".join(f"{k}: {v}" for k, v in summary["failures_by_outcome"].items()))
    table.add_row("served by the primary", str(summary["by_primary"]), f"{100 * summary['by_primary'] / total:.1f} %")
    table.add_row("served by the fallback", str(summary["by_fallback"]), f"{100 * summary['by_fallback'] / total:.1f} %")
    table.add_row("time to first token p50", ms(summary["ttft_p50_ms"]), "as the client saw it, successes")
    table.add_row("time to first token p95", ms(summary["ttft_p95_ms"]), f"max {ms(summary['ttft_max_ms'])}")
    crashes = summary["primary_crashes"]
    table.add_row("primary crashes", f"[{'green' if crashes == 0 else 'red'}]{crashes}[/]",
                  f"down {summary['primary_down_s']:g} s" if crashes else
                  f"peak: {summary['primary_peak_batch']} running, {summary['primary_peak_queue']} queued "
                  f"(it crashes past 50 held)")
    ejections = summary["ejections"]
    table.add_row("ejections of the primary", str(len(ejections)), "")
    for e in ejections:
        back = "returned" if e["returned"] else "still ejected at the end"
        table.add_row("", f"k={e['k']}", f"for {e['duration_s']:g} s from t={e['start_s']:.1f} s "
                      f"(failure rate {e['failure_rate']:.0f} %), {back}" if e["failure_rate"] is not None else
                      f"for {e['duration_s']:g} s from t={e['start_s']:.1f} s, {back}")
    table.add_row("failovers", str(summary["failovers"]), "attempts retried on the next candidate")
    if scale != 1:
        table.add_row("time scale", f"{scale:g}", "durations above are wall-clock")
    return table


def _printer(console):
    return lambda line: console.print("  " + line, soft_wrap=True, highlight=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmbench.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help=f"time scale (the simulators' --time-scale; < 1 runs faster); default {DEFAULT_SCALE:g}")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the load; default {DEFAULT_SEED}")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder; default out/ (the run goes to OUT/demo/)")
    p.add_argument("--no-panel", action="store_true", help="without the live panel")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be positive")

    started = time.monotonic()
    console = Console() if is_terminal() else Console(width=120)
    out = Path(args.out)
    folder = out / "demo"
    load, variant = DEFAULT_LOAD, VARIANTS[DEMO_VARIANT]
    terminal = is_terminal()
    capacity = estimated_capacity(load.max_tokens)
    console.print(f"[bold]llm-ha demo[/bold]: a traffic spike on a self-hosted model, llm-ha in front of it.\n"
                  f"{describe_scale(args.scale)}.\n"
                  f"load: {load.before_s:g} s at {load.steady_rate:g} requests/s, then a spike of {load.spike_s:g} s at "
                  f"{load.spike_rate:g}/s (about {load.spike_rate / capacity:.0f}x what the primary serves, "
                  f"~{capacity:.1f}/s), then {load.after_s:g} s at {load.steady_rate:g}/s (times in the document's "
                  f"seconds); profile: threshold {REFERENCE.failure_rate_threshold:g} %, interval "
                  f"{REFERENCE.interval:g} s, base ejection {REFERENCE.base_ejection_time:g} s, first-byte timeout "
                  f"{REFERENCE.first_byte_timeout * 1000:g} ms (x the time scale); seed {args.seed}.\n"
                  f"output: {folder}/" + ("" if terminal else f"; mitmdump's log: {folder}/mitmdump.log"))
    if terminal:
        console.print("mitmdump with llm-ha writes below" + ("" if args.no_panel else " (with its live panel)") + ".\n")
    try:
        result = run_scenario(variant, scale=args.scale, seed=args.seed, load=load, out_dir=folder,
                              panel=not args.no_panel, terminal=terminal, confdir=str(out / ".mitmproxy"),
                              progress=None if terminal else _printer(console))
    except KeyboardInterrupt:
        console.print("\n[red]interrupted[/red]: every process of the demo was stopped.")
        sys.exit(130)
    summary = summarize_run(result)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print()
    console.print(summary_table(summary))
    try:
        from .timeline import PlotUnavailable, write_timeline

        png = write_timeline(result, folder / "timeline.png",
                             title=f"llm-ha demo: {variant.title}, seed {args.seed}, time scale {args.scale:g}")
        console.print(f"\ntimeline (PNG): {png}")
    except PlotUnavailable as exc:
        console.print(f"\n{exc}")
    console.print(f"records, events, profile, status: {folder}/; took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
