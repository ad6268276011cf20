"""The retry budget (and hedging) on the spike, with and without ejection: `make bench-budget`.

Issue 14's measurement, two scenarios (`--scenario eject|no-eject|both`, default both).

Scenario A, `eject`: the spike of `llmbench.scenario` (seeded open-loop load, 64-token answers)
through mitmdump + llm-ha in front of a primary of TWO simulated 7B-on-A10 nodes (`--preset primary`:
each queues, slows down and crashes past its memory) and the fallback simulator, run three ways, the
same seed, interleaved (the order rotates each round), fresh processes for every run:

1. `budget`: the retry budget as shipped (20 % of requests + 1/s over 10 s);
2. `no-budget`: the budget effectively off (`percent: 100, min_per_s: 1000`, about 10,000 retries per
   window: the profile has no switch to turn it off, so a budget no run can exhaust stands in);
3. `hedge`: the budget as shipped and `hedge_after: 150ms` on the primary (an attempt without a first
   token by then is joined by the next candidate that has room; the first token wins).

`max_attempts_per_upstream` stays at its default (3): with two primary nodes a request makes at most
two attempts there. Every other setting is the source document's (first-byte timeout 200 ms, failure
rate threshold 50 % per 1 s interval, ejections k x 30 s) at its pace (time scale 1).

Figures per run: requests sent, client-visible failures, the primary's attempts per request (POST
requests counted at the primary's simulators, probes apart), all attempts per request (the
`x-llm-ha-attempts` header), the same two during the spike (the POSTs that reached the simulators
between the spike's start and end, counted then, over the requests sent in it; and the spike
requests' `x-llm-ha-attempts`), the most attempts one request made, the primary attempts of the
requests the fallback served (their `x-llm-ha-attempts` less the fallback's one), retries made and
refused by the budget (llm-ha's `/status`), TTFT p50/p95/p99 as the client measured it, the share
served by the primary, ejections, primary crashes.
With several rounds each figure is the median [min-max] over the rounds, and the ratios to `budget`
are the medians of the per-round ratios. Two figures help read the TTFT percentiles: the TTFT of the
requests that made more than one attempt (those the budget and hedging act on), and a control, the
TTFT p95 of the requests the fallback served at their first attempt (after the ejections; no variant
changes what happens to them, so their spread between runs is the machine's noise; scenario B has no
such requests, nothing being ejected). The load average
before and after each run says how busy the machine was. Everything is written to `out/bench-budget/`
(a folder per scenario and run, summary.json).

The load: the scenario's spike unchanged (20 s at 14 requests/s), its steady phases shortened to 10 s
before and 15 s after (2 requests/s) so that two rounds of three runs fit in about 5 minutes. Two nodes
serve about 9.4 requests/s at their full batches, so the spike is about 1.5 times what the primary can
serve (a spike of three times, 28/s, would measure this 2-core machine's limits, see `llmbench.scenario`).

Scenario B, `no-eject`: what the budget is for, a fully overloaded primary of many nodes that stays
in rotation. The same seeded spike (its steady phases cut to 5 s before and 5 s after) to a primary of
FOUR simulator nodes, each smaller (`--max-batch 4`: about 2.05 requests/s, 8.2 together, so the
14/s spike is about 1.7 times what the primary can serve; four nodes of the full batch would take a
28/s spike, which would measure this 2-core machine's limits, as above). Passive health checking is switched off
for this scenario (`failure_rate_threshold: 100` and `min_requests: 1000000`: no 1 s interval ever
has a million attempts, so no node is ejected), and `max_attempts_per_upstream: 4` on the primary,
so that a request may try every primary node before the fallback. The same three runs, the same
figures; without a budget a request whose first attempt times out can make up to four primary attempts
(each 200 ms), with it the primary's retries are bounded to about 20 % of its requests (plus 1/s).

    python -m llmbench.bench_budget [--scenario both] [--rounds 2] [--seed 7] [--only budget,hedge]
                                    [--hedge-after 150ms]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmsim.control import start_simulator
from llmsim.loadgen import percentile

from .proxy import start_mitmdump
from .scenario import (
    DEFAULT_OUT,
    DEFAULT_SEED,
    REFERENCE,
    RunResult,
    SpikeLoad,
    Variant,
    _drive,
    _read_events,
    _save,
    ejection_periods,
    estimated_capacity,
    selected_runs,
    summarize_run,
)

CHAT = "POST /v1/chat/completions"
OFF_BUDGET = {"percent": 100, "min_per_s": 1000}
NO_EJECTION = {"failure_rate_threshold": 100, "min_requests": 1_000_000}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    primary_nodes: int
    load: SpikeLoad
    max_batch: int | None = None  # the primary nodes' `--max-batch`; None: the preset's (16)
    health: dict = field(default_factory=dict)  # `health_check` keys that differ from the document's
    max_attempts: int | None = None  # the primary's `max_attempts_per_upstream`; None: the default (3)

    @property
    def capacity(self) -> float:
        """Requests/s the whole primary serves at its full batches."""
        return self.primary_nodes * estimated_capacity(self.load.max_tokens, batch=self.max_batch)

    def describe(self) -> str:
        load = self.load
        nodes = f"{self.primary_nodes} nodes" + (f" of max batch {self.max_batch}" if self.max_batch else "")
        health = ", ".join(f"{k} {v}" for k, v in self.health.items()) or "the document's"
        attempts = self.max_attempts or 3
        return (f"a primary of {nodes} (about {self.capacity:.1f} requests/s at full batches) and the fallback; "
                f"load {load.before_s:g} s at {load.steady_rate:g}/s, spike {load.spike_s:g} s at "
                f"{load.spike_rate:g}/s, {load.after_s:g} s at {load.steady_rate:g}/s; health_check: {health}; "
                f"max_attempts_per_upstream {attempts}")


SCENARIOS = {s.name: s for s in (
    Scenario("eject", "A: two nodes, ejection at the document's settings", 2,
             SpikeLoad(before_s=10.0, spike_s=20.0, after_s=15.0)),
    Scenario("no-eject", "B: four small nodes, passive health checking off", 4,
             SpikeLoad(before_s=5.0, spike_s=20.0, after_s=5.0), max_batch=4, health=NO_EJECTION, max_attempts=4),
)}


@dataclass(frozen=True)
class BudgetVariant:
    name: str
    title: str
    budget: dict | None = None  # the profile's `retry_budget`; None: the defaults
    hedge: bool = False  # `hedge_after` on the primary


VARIANTS = {v.name: v for v in (
    BudgetVariant("budget", "retry budget on (defaults: 20 %, 1/s, 10 s)"),
    BudgetVariant("no-budget", "retry budget off (percent 100, min_per_s 1000)", budget=OFF_BUDGET),
    BudgetVariant("hedge", "retry budget on + hedge_after on the primary", hedge=True),
)}


def profile_text(scenario: Scenario, variant: BudgetVariant, primaries: list[str], fallback: str,
                 hedge_after: float) -> str:
    r = REFERENCE
    health = {"failure_rate_threshold": f"{r.failure_rate_threshold:g}", "interval": f"{r.interval:g}s",
              "base_ejection_time": f"{r.base_ejection_time:g}s", "max_ejection_time": f"{r.max_ejection_time:g}s",
              "min_requests": "1", **{k: str(v) for k, v in scenario.health.items()}}
    nodes = ", ".join(f'"{url}"' for url in primaries)
    budget = ""
    if variant.budget:
        budget = "retry_budget:\n" + "".join(f"  {k}: {v}\n" for k, v in variant.budget.items())
    hedge = f"    hedge_after: {hedge_after * 1000:g}ms\n" if variant.hedge else ""
    attempts = f"    max_attempts_per_upstream: {scenario.max_attempts}\n" if scenario.max_attempts else ""
    return (
        f"# bench-budget, scenario {scenario.title}: {variant.title}; written by llmbench.bench_budget\n"
        f"match: \"~u /v1/\"\n"
        f"first_byte_timeout: {r.first_byte_timeout * 1000:g}ms\n"
        f"request_timeout: {r.request_timeout:g}s\n"
        f"health_check:\n"
        + "".join(f"  {k}: {v}\n" for k, v in health.items())
        + f"{budget}"
        f"upstreams:\n"
        f"  - name: primary\n"
        f"    nodes: [{nodes}]\n"
        f"{attempts}"
        f"{hedge}"
        f"  - name: fallback\n"
        f"    nodes: [\"{fallback}\"]\n"
        f"    first_byte_timeout: {r.fallback_first_byte_timeout:g}s\n"
    )


def run_one(scenario: Scenario, variant: BudgetVariant, seed: int, folder: Path, confdir: str,
            hedge_after: float) -> dict:
    """Fresh simulators and mitmdump, the load, the figures; every process stopped at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    events_path = folder / "events.jsonl"
    events_path.unlink(missing_ok=True)
    sim_args = ("--preset", "primary", "--seed", str(seed), "--log-level", "WARNING")
    if scenario.max_batch:
        sim_args += ("--max-batch", str(scenario.max_batch))
    load = scenario.load
    with contextlib.ExitStack() as stack:
        primaries = [stack.enter_context(start_simulator(*sim_args)) for _ in range(scenario.primary_nodes)]
        fallback = stack.enter_context(start_simulator("--preset", "fallback", "--seed", str(seed),
                                                       "--log-level", "WARNING"))
        profile = folder / "profile.yaml"
        profile.write_text(profile_text(scenario, variant, [p.url for p in primaries], fallback.url, hedge_after))
        options = {"llm_ha_events": str(events_path), "flow_detail": 0, "termlog_verbosity": "warn"}
        proxy = stack.enter_context(start_mitmdump(profile, primaries[0].url, options=options, confdir=confdir,
                                                   log_path=str(folder / "mitmdump.log")))
        loadavg_before = os.getloadavg()[0]
        t0 = time.time()
        spike_counts = SpikeCounts(primaries, t0, load)
        records = asyncio.run(_drive(load.phases(), f"{proxy.url}/v1", seed, load.max_tokens, proxy, primaries[0],
                                     t0, None))
        t_end = time.time()
        spike_counts.cancel()
        time.sleep(REFERENCE.interval)  # the ticker logs what is due; the event log reaches the disk
        status = proxy.status()
        node_stats = [p.stats() for p in primaries]
        fallback_stats = fallback.stats()
    primary_stats = {"crash_times": sorted(t for s in node_stats for t in s["crash_times"]),
                     "peak_queue": max(s["peak_queue"] for s in node_stats),
                     "peak_batch": max(s["peak_batch"] for s in node_stats), "nodes": node_stats}
    result = RunResult(variant=Variant(variant.name, variant.title), scale=1.0, seed=seed, load=load, t0=t0,
                       t_end=t_end, records=records, primary_stats=primary_stats, fallback_stats=fallback_stats,
                       events=_read_events(events_path), restart_s=REFERENCE.restart_time,
                       first_byte_timeout_s=REFERENCE.first_byte_timeout, final_status=status, folder=folder)
    _save(result)
    return figures(result, node_stats, fallback_stats, status, loadavg_before, spike_counts.attempts())


class SpikeCounts:
    """The primary's POSTs counted at its simulators when the spike starts and when it ends."""

    def __init__(self, primaries: list, t0: float, load: SpikeLoad) -> None:
        self.primaries = primaries
        self.counts: dict[str, int] = {}
        start, end = load.spike_window()
        self.timers = [threading.Timer(t0 + at - time.time(), self.count, (name,))
                       for name, at in (("start", start), ("end", end))]
        for timer in self.timers:
            timer.daemon = True
            timer.start()

    def count(self, name: str) -> None:
        with contextlib.suppress(Exception):  # a simulator that cannot answer: no spike figure, the run goes on
            self.counts[name] = sum(p.stats()["by_route"].get(CHAT, 0) for p in self.primaries)

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()
            if timer.is_alive():
                timer.join()

    def attempts(self) -> int | None:
        """Primary attempts that reached the simulators during the spike; None if a count is missing."""
        if "start" not in self.counts or "end" not in self.counts:
            return None
        return self.counts["end"] - self.counts["start"]


def figures(result: RunResult, node_stats: list[dict], fallback_stats: dict, status: dict,
            loadavg_before: float, spike_primary_attempts: int | None = None) -> dict:
    summary = summarize_run(result)
    requests = summary["requests"] or 1
    primary_attempts = sum(s["by_route"].get(CHAT, 0) for s in node_stats)
    budget = next(u for u in status["upstreams"] if u["name"] == "primary").get("retry_budget", {})
    ttfts = [r.ttft for r in result.records if r.ok and r.ttft is not None]
    spike = [r.ttft for r in result.records if r.ok and r.ttft is not None and r.phase == "spike"]
    ejections = ejection_periods(result.events, "primary")
    retried = [r.ttft for r in result.records if r.ok and r.ttft is not None and (r.attempts or 0) > 1]
    control = [r.ttft for r in result.records if r.ok and r.ttft is not None and r.attempts == 1
               and r.upstream == "fallback"]
    spike_requests = [r for r in result.records if r.phase == "spike"]
    by_fallback = [r.attempts for r in result.records if r.ok and r.attempts and r.upstream == "fallback"]
    return {
        **summary,
        "primary_attempts": primary_attempts,
        "primary_attempts_per_request": primary_attempts / requests,
        "fallback_attempts": fallback_stats["by_route"].get(CHAT, 0),
        "attempts_per_request": sum(r.attempts or 0 for r in result.records) / requests,
        "spike_primary_attempts_per_request": (None if spike_primary_attempts is None or not spike_requests
                                               else spike_primary_attempts / len(spike_requests)),
        "spike_attempts_per_request": (sum(r.attempts or 0 for r in spike_requests) / len(spike_requests)
                                       if spike_requests else None),
        "max_attempts": max((r.attempts or 0 for r in result.records), default=0),
        "fallback_served_primary_attempts": (sum(by_fallback) / len(by_fallback) - 1) if by_fallback else None,
        "probes": sum(s["by_route"].get("GET /v1/models", 0) for s in node_stats),
        "retries": budget.get("retries"),
        "retries_denied": budget.get("retries_denied"),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "spike_ttft_p95_ms": _ms(percentile(spike, 95)),
        "spike_ttft_p99_ms": _ms(percentile(spike, 99)),
        "multi_attempt_requests": len(retried),
        "multi_attempt_ttft_p50_ms": _ms(percentile(retried, 50)),
        "control_ttft_p95_ms": _ms(percentile(control, 95)),
        "ejection_count": len(ejections),
        "ejections_text": ", ".join(f"node {_node_index(e['node'], status)} k{e['k']}" for e in ejections) or "-",
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg()[0],
    }


def _node_index(url: str, status: dict) -> int:
    nodes = next(u for u in status["upstreams"] if u["name"] == "primary")["nodes"]
    return next((i + 1 for i, n in enumerate(nodes) if n["url"] == url), 0)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

ROWS = [  # (key, label, format, ratio to `budget`?)
    ("requests", "requests sent", "{:.0f}", False),
    ("failed", "client-visible failures", "{:.0f}", False),
    ("primary_attempts_per_request", "primary attempts / request (at the simulators)", "{:.3f}", True),
    ("primary_attempts", "primary attempts (POSTs at its nodes)", "{:.0f}", True),
    ("attempts_per_request", "attempts / request, all upstreams (x-llm-ha-attempts)", "{:.3f}", True),
    ("spike_primary_attempts_per_request", "spike: primary attempts / spike request (simulators)", "{:.3f}", True),
    ("spike_attempts_per_request", "spike: attempts / spike request, all upstreams", "{:.3f}", True),
    ("max_attempts", "most attempts made by one request", "{:.0f}", False),
    ("fallback_served_primary_attempts", "served by the fallback: primary attempts each, mean", "{:.2f}", True),
    ("retries", "primary retries made (budget)", "{:.0f}", False),
    ("retries_denied", "primary retries refused (budget)", "{:.0f}", False),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.0f}", True),
    ("ttft_p95_ms", "TTFT p95 (ms)", "{:.0f}", True),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.0f}", True),
    ("spike_ttft_p95_ms", "TTFT p95, spike requests (ms)", "{:.0f}", True),
    ("spike_ttft_p99_ms", "TTFT p99, spike requests (ms)", "{:.0f}", True),
    ("multi_attempt_requests", "requests with more than one attempt", "{:.0f}", False),
    ("multi_attempt_ttft_p50_ms", "TTFT p50 of those (ms)", "{:.0f}", True),
    ("control_ttft_p95_ms", "control: TTFT p95, fallback at the 1st attempt (ms)", "{:.0f}", True),
    ("primary_share", "served by the primary (%)", "{:.1f}", True),
    ("ejection_count", "ejections of primary nodes", "{:.0f}", False),
    ("primary_crashes", "primary crashes", "{:.0f}", False),
]


def _value(run: dict, key: str) -> float | None:
    value = run.get(key)
    if value is None:
        return None
    return 100 * value if key == "primary_share" else float(value)


def cell(values: list[float | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    median = fmt.format(statistics.median(known))
    if len(known) == 1 or min(known) == max(known):
        return median
    return f"{median} [{fmt.format(min(known))}-{fmt.format(max(known))}]"


def ratio_cell(runs: list[dict], base: list[dict], key: str) -> str:
    ratios = [a / b for a, b in ((_value(r, key), _value(s, key)) for r, s in zip(runs, base, strict=False))
              if a is not None and b]
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text if len(ratios) == 1 else f"{text} [{min(ratios):.2f}-{max(ratios):.2f}]"


def build_table(by_variant: dict[str, list[dict]], title: str) -> Table:
    names = list(by_variant)
    table = Table(title=escape(title), title_justify="left")
    table.add_column("figure", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    others = [n for n in names if n != "budget"] if "budget" in by_variant else []
    for name in others:
        table.add_column(f"{name} / budget", justify="right")
    for key, label, fmt, with_ratio in ROWS:
        cells = [cell([_value(r, key) for r in by_variant[n]], fmt) for n in names]
        ratios = [ratio_cell(by_variant[n], by_variant["budget"], key) if with_ratio else "" for n in others]
        table.add_row(label, *cells, *ratios)
    ejections = ["; ".join(r["ejections_text"] for r in by_variant[n]) for n in names]
    table.add_row("ejections per round (node, k)", *ejections, *["" for _ in others])
    return table


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmbench.bench_budget", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="runs: " + "; ".join(f"{v.name}: {v.title}" for v in VARIANTS.values()))
    p.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both",
                   help="eject (A), no-eject (B) or both (default), in that order")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every run, interleaved; default 2")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the load; default {DEFAULT_SEED}")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="these runs only (NAME,NAME)")
    p.add_argument("--hedge-after", default="150ms", help="the hedge run's hedge_after; default 150ms")
    p.add_argument("--out", default=str(DEFAULT_OUT / "bench-budget"), help="output folder")
    args = p.parse_args(argv)
    names = selected_runs(p, args.only, VARIANTS)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    from llmha.core.profile import parse_duration

    try:
        args.hedge_after_s = parse_duration(args.hedge_after)
    except ValueError:
        p.error(f"bad --hedge-after {args.hedge_after!r}")
    args.names = [n for n in VARIANTS if n in names] if names else list(VARIANTS)
    args.scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    loadavg_start = os.getloadavg()
    console.print(f"[bold]bench-budget[/bold]: seed {args.seed}, {args.rounds} round(s) of {', '.join(args.names)} "
                  f"per scenario ({', '.join(args.scenarios)}); load average before: {_loadavg(loadavg_start)}")
    results: dict[str, dict] = {}
    for name in args.scenarios:
        results[name] = run_scenario(SCENARIOS[name], args, out / name, console)
        if results[name]["interrupted"]:
            break
    loadavg_end = os.getloadavg()
    console.print(f"load average (1, 5, 15 min) before: {_loadavg(loadavg_start)}, after: {_loadavg(loadavg_end)} "
                  f"(2 cores; the runs' own load included)")
    console.print(f"hedge run: hedge_after {args.hedge_after_s * 1000:g} ms on the primary; budget off: "
                  f"retry_budget {OFF_BUDGET}; scenario B's health_check: {NO_EJECTION}")
    (out / "summary.json").write_text(json.dumps({"seed": args.seed, "rounds": args.rounds,
                                                  "loadavg_before": loadavg_start, "loadavg_after": loadavg_end,
                                                  "scenarios": results}, indent=1, default=str))
    console.print(f"written: {out}/summary.json and a folder per run; took {time.monotonic() - started:.0f} s")
    if not any(r["runs"] for r in results.values()):
        raise SystemExit(1)


def run_scenario(scenario: Scenario, args: argparse.Namespace, out: Path, console: Console) -> dict:
    """The scenario's rounds, interleaved, then its table."""
    console.print(f"[bold]scenario {escape(scenario.title)}[/bold]: {escape(scenario.describe())}", highlight=False)
    by_variant: dict[str, list[dict]] = {n: [] for n in args.names}
    interrupted = False
    try:
        for round_no in range(args.rounds):
            order = args.names[round_no % len(args.names):] + args.names[:round_no % len(args.names)]
            for name in order:
                run = run_one(scenario, VARIANTS[name], args.seed, out / f"round{round_no + 1}" / name,
                              str(out.parent / ".mitmproxy"), args.hedge_after_s)
                run["round"] = round_no + 1
                by_variant[name].append(run)
                console.print(f"  round {round_no + 1} {name}: {run['requests']} requests, {run['failed']} failed, "
                              f"primary attempts/request {run['primary_attempts_per_request']:.3f}, TTFT p95/p99 "
                              f"{_fmt(run['ttft_p95_ms'])}/{_fmt(run['ttft_p99_ms'])} ms, served by primary "
                              f"{100 * (run['primary_share'] or 0):.1f} %, ejections {run['ejections_text']}; "
                              f"load average {run['loadavg_before']:.2f} -> {run['loadavg_after']:.2f}",
                              highlight=False)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]; the runs so far:")
        interrupted = True
    by_variant = {n: runs for n, runs in by_variant.items() if runs}
    if by_variant:
        rounds = min(len(r) for r in by_variant.values())
        what = "median [min-max] over the rounds" if rounds > 1 else "one round"
        console.print(build_table(by_variant, f"bench-budget, scenario {scenario.title}, seed {args.seed}, "
                                              f"{rounds} round(s): {what}; ratios to 'budget' per round"))
    return {"scenario": scenario.describe(), "load": scenario.load.__dict__, "runs": by_variant,
            "interrupted": interrupted}


def _loadavg(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
