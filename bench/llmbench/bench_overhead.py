"""What llm-ha costs on the data path: `make bench-overhead`.

One ideal upstream (the simulator with --no-physics, so the upstream adds almost nothing) is reached
three ways in the same run, each with the same sequence of streaming requests from the real openai
client: straight to the upstream, through mitmdump without the addon (mitmproxy's own floor), and
through mitmdump with llm-ha. Prints time to first token and total time (median, p95) and the
ratios to the direct run, and the proxy's CPU seconds per 1000 requests.

    python -m llmbench.bench_overhead [--requests 300] [--concurrency 1] [--panel]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
from rich.console import Console
from rich.table import Table

from llmsim.control import start_simulator

from .peers import cpu_seconds
from .proxy import start_mitmdump

PROFILE = """
first_byte_timeout: 2s
upstreams:
  - name: primary
  - name: fallback
    nodes: ["{fallback}"]
"""


@dataclass
class Run:
    name: str
    ttft: list[float]
    total: list[float]
    cpu_s: float | None

    def pct(self, values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


async def measure(base_url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[list, list]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=30)
    ttft, total = [], []
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with semaphore:
            start = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=max_tokens)
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            ttft.append(first)
            total.append(time.perf_counter() - start)

    for _ in range(min(10, requests)):  # warm up connections and code paths, not counted
        await one()
    ttft.clear(), total.clear()
    await asyncio.gather(*(one() for _ in range(requests)))
    await client.close()
    return ttft, total


@contextlib.contextmanager
def proxy_for(upstream: str, fallback: str, with_addon: bool, panel: bool, confdir: str) -> Iterator:
    profile = None
    if with_addon:
        profile = Path(confdir) / "bench-profile.yaml"
        profile.write_text(PROFILE.format(fallback=fallback))
    options = {"flow_detail": 0, "termlog_verbosity": "warn", "stream_large_bodies": "1"}  # stream, as llm-ha does
    if panel:
        options["llm_ha_panel"] = True
    proxy = start_mitmdump(profile, reverse=upstream, status=with_addon, confdir=confdir, options=options,
                           terminal=panel)
    try:
        yield proxy
    finally:
        proxy.stop()


def run_all(requests: int, concurrency: int, max_tokens: int, panel: bool) -> list[Run]:
    runs = []
    with (start_simulator("--no-physics") as upstream, start_simulator("--preset", "fallback") as fallback,
          tempfile.TemporaryDirectory() as confdir):
        ttft, total = asyncio.run(measure(upstream.url, requests, concurrency, max_tokens))
        runs.append(Run("direct to the upstream", ttft, total, None))
        variants = [("mitmdump, no addon", False, False), ("mitmdump + llm-ha", True, False)]
        if panel:
            variants.append(("mitmdump + llm-ha + panel", True, True))
        for name, with_addon, with_panel in variants:
            with proxy_for(upstream.url, fallback.url, with_addon, with_panel, confdir) as proxy:
                before = cpu_seconds(proxy.process.pid)
                ttft, total = asyncio.run(measure(proxy.url, requests, concurrency, max_tokens))
                cpu = cpu_seconds(proxy.process.pid) - before
            runs.append(Run(name, ttft, total, cpu))
    return runs


def report(runs: list[Run], requests: int, concurrency: int) -> Table:
    base = runs[0]
    base_ttft, base_total = statistics.median(base.ttft), statistics.median(base.total)
    table = Table(title=f"llm-ha overhead: {requests} streaming requests, concurrency {concurrency}")
    for column in ("path", "TTFT p50 ms", "TTFT p95 ms", "total p50 ms", "total p95 ms",
                   "TTFT p50 ratio", "total p50 ratio", "proxy CPU s / 1000 req"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for run in runs:
        ttft50, total50 = statistics.median(run.ttft), statistics.median(run.total)
        table.add_row(run.name, f"{ttft50 * 1000:.2f}", f"{run.pct(run.ttft, 95) * 1000:.2f}",
                      f"{total50 * 1000:.2f}", f"{run.pct(run.total, 95) * 1000:.2f}",
                      f"{ttft50 / base_ttft:.2f}x", f"{total50 / base_total:.2f}x",
                      "-" if run.cpu_s is None else f"{run.cpu_s / requests * 1000:.2f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--panel", action="store_true",
                        help="also run with the live panel on (mitmdump gets a pseudo-terminal)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks: stop what we started
    runs = run_all(args.requests, args.concurrency, args.max_tokens, args.panel)
    Console(width=160).print(report(runs, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
