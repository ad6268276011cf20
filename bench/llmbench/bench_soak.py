"""Does llm-ha hold steady over many requests? `make bench-soak`.

10,000 streamed requests (16 tokens at 10 ms each, from `python -m llmsim.server --no-physics
--token-time 0.01`) through mitmdump + llm-ha, about 100 at a time (100 clients, each on its own
keep-alive connection, one request after the other). mitmdump's RSS and open file descriptors are
sampled every 10 s. The first sample is taken idle, after a warm-up of one request per client; the
last idle too, once the load has ended and the clients have closed their connections. Reported: growth
from the first sample to the last (target: none beyond noise), client errors (errors, short answers,
answers from the fallback; target 0), requests still in flight in llm-ha's /status at the end
(target 0). The results also go to out/bench-soak/ as JSON.

    python -m llmbench.bench_soak [--requests 10000] [--concurrency 100] [--sample-interval 10] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmsim.control import start_simulator

from .bench_overhead import (
    PROFILE,
    SIM_QUIET,
    Answer,
    RawConnection,
    first_error,
    open_fds,
    percentile,
    problems,
    proc_status_kib,
    proxy_cpu_seconds,
    raise_fd_limit,
    stream_request,
)
from .proxy import REPO, MitmProcess, start_mitmdump

OUT_DIR = REPO / "out" / "bench-soak"
SETTLE_S = 1.0  # after the clients close their connections, before an idle sample
RSS_NOISE_MIB = 5.0  # growth up to this counts as noise (allocator arenas, pools reaching their size)


@dataclass
class Sample:
    t_s: float
    requests_done: int
    errors: int
    rss_mib: float
    fds: int
    cpu_pct: float  # of one core, since the previous sample


class Soak:
    """The load, its sampler, and what they saw."""

    def __init__(self, proxy: MitmProcess, requests: int, concurrency: int, max_tokens: int) -> None:
        self.proxy = proxy
        self.pid = proxy.process.pid
        self.requests = requests
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.request = stream_request(f"127.0.0.1:{proxy.port}", max_tokens)
        self.answers: list[Answer] = []
        self.samples: list[Sample] = []
        self._left = requests
        self._started = time.perf_counter()
        self._last_cpu = (self._started, proxy_cpu_seconds(self.pid))

    def sample(self) -> Sample:
        now, cpu = time.perf_counter(), proxy_cpu_seconds(self.pid)
        then, cpu_then = self._last_cpu
        self._last_cpu = (now, cpu)
        sample = Sample(round(now - self._started, 1), len(self.answers), problems(self.answers, self.max_tokens),
                        proc_status_kib(self.pid, "VmRSS") / 1024, open_fds(self.pid),
                        100 * (cpu - cpu_then) / max(now - then, 1e-9))
        self.samples.append(sample)
        return sample

    async def warm_up(self) -> None:
        """One request per client at once, not counted: pools and buffers reach their working size."""
        async def one() -> None:
            connection = RawConnection("127.0.0.1", self.proxy.port)
            await connection.stream(self.request)
            await connection.close()

        await asyncio.gather(*(one() for _ in range(self.concurrency)))

    async def _client(self) -> None:
        connection = RawConnection("127.0.0.1", self.proxy.port)
        try:
            while self._left > 0:
                self._left -= 1
                self.answers.append(await connection.stream(self.request))
        finally:
            await connection.close()

    async def _sampler(self, interval: float, say) -> None:
        while True:
            await asyncio.sleep(interval)
            say(self.sample())

    async def run(self, interval: float, say) -> float:
        """The whole soak; its load's duration in seconds."""
        await self.warm_up()
        await asyncio.sleep(SETTLE_S)
        self._started = time.perf_counter()
        self._last_cpu = (self._started, proxy_cpu_seconds(self.pid))
        say(self.sample())
        sampler = asyncio.create_task(self._sampler(interval, say))
        await asyncio.gather(*(self._client() for _ in range(self.concurrency)))
        duration = time.perf_counter() - self._started
        sampler.cancel()
        await asyncio.sleep(SETTLE_S)
        say(self.sample())
        return duration


def start_proxy(which: str, profile: Path, upstream: str, workdir: Path) -> MitmProcess:
    """mitmdump + llm-ha, or bare mitmdump (streaming bodies as llm-ha does: `stream_large_bodies`)."""
    options = {"flow_detail": 0, "termlog_verbosity": "warn"}
    common = {"confdir": str(workdir / "mitmproxy-conf"), "log_path": str(workdir / "mitmdump.log")}
    if which == "llm-ha":
        return start_mitmdump(profile, reverse=upstream, options=options, **common)
    script = workdir / "bare.py"
    script.write_text('"""No addon."""\n')
    return start_mitmdump(None, reverse=upstream, options={**options, "stream_large_bodies": "1"}, status=False,
                          script=script, **common)


def inflight(proxy: MitmProcess) -> int:
    return sum(node["inflight"] for upstream in proxy.status()["upstreams"] for node in upstream["nodes"])


def samples_table(samples: list[Sample]) -> Table:
    table = Table(title="mitmdump + llm-ha over the soak (first and last samples: idle)", title_justify="left")
    for column in ("t s", "requests done", "client errors", "RSS MiB", "open fds", "proxy CPU %"):
        table.add_column(column, justify="right")
    for s in samples:
        table.add_row(f"{s.t_s:g}", str(s.requests_done), str(s.errors), f"{s.rss_mib:.1f}", str(s.fds),
                      f"{s.cpu_pct:.0f}")
    return table


def summary(samples: list[Sample], answers: list[Answer], duration: float, in_flight: int, peak_rss_kib: int,
            max_tokens: int) -> dict:
    first, last = samples[0], samples[-1]
    loaded = samples[1:-1] or samples
    middle = loaded[len(loaded) // 2]
    ttfts = [a.first_token for a in answers if a.first_token is not None]
    return {
        "requests": len(answers), "client_errors": problems(answers, max_tokens), "first_error": first_error(answers),
        "duration_s": round(duration, 1), "requests_per_s": round(len(answers) / duration, 1),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 2), "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 2),
        "rss_first_mib": round(first.rss_mib, 1), "rss_last_mib": round(last.rss_mib, 1),
        "rss_growth_mib": round(last.rss_mib - first.rss_mib, 1),
        "rss_growth_pct": round(100 * (last.rss_mib - first.rss_mib) / first.rss_mib, 1) if first.rss_mib else None,
        "rss_growth_under_load_second_half_mib": round(loaded[-1].rss_mib - middle.rss_mib, 1),
        "fds_first": first.fds, "fds_last": last.fds, "fds_growth": last.fds - first.fds,
        "inflight_at_end": in_flight, "peak_rss_mib": round(peak_rss_kib / 1024, 1),
    }


def targets_table(result: dict) -> Table:
    table = Table(title="Soak targets", title_justify="left")
    for column in ("target", "measured", "met"):
        table.add_column(column, justify="left" if column == "target" else "right")
    rows = [
        (f"RSS growth first to last sample <= {RSS_NOISE_MIB:g} MiB (noise)",
         (f"{result['rss_growth_mib']:+.1f} MiB ({result['rss_first_mib']:.1f} -> {result['rss_last_mib']:.1f}); "
          f"second half under load {result['rss_growth_under_load_second_half_mib']:+.1f}"),
         result["rss_growth_mib"] <= RSS_NOISE_MIB),
        ("open fds growth first to last sample = 0",
         f"{result['fds_growth']:+d} ({result['fds_first']} -> {result['fds_last']})", result["fds_growth"] <= 0),
        ("client errors = 0", f"{result['client_errors']} of {result['requests']}", result["client_errors"] == 0),
        ("in flight at the end = 0", str(result["inflight_at_end"]), result["inflight_at_end"] == 0),
    ]
    for text, value, met in rows:
        table.add_row(text, value, "yes" if met else "NO")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmbench.bench_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 requests, 20 at a time, a sample a second")
    parser.add_argument("--requests", type=int, default=None, help="streamed requests; default 10000")
    parser.add_argument("--concurrency", type=int, default=None, help="clients at once; default 100")
    parser.add_argument("--sample-interval", type=float, default=None, help="seconds between samples; default 10")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer; default 16")
    parser.add_argument("--token-time", type=float, default=0.01, help="seconds per token upstream; default 0.01")
    parser.add_argument("--proxy", choices=("llm-ha", "mitmdump"), default="llm-ha",
                        help="mitmdump + llm-ha (default), or bare mitmdump for comparison")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder of the JSON results; default {OUT_DIR}")
    args = parser.parse_args(argv)
    quick = {"requests": 400, "concurrency": 20, "sample_interval": 1.0}
    full = {"requests": 10_000, "concurrency": 100, "sample_interval": 10.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.requests < 1 or args.concurrency < 1 or args.sample_interval <= 0:
        parser.error("--requests and --concurrency must be at least 1, --sample-interval positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks: stop what we started
    raise_fd_limit()
    console = Console(width=160)
    console.print(f"Soak: {args.requests} streamed requests of {args.max_tokens} tokens "
                  f"({args.token_time * 1000:g} ms/token), {args.concurrency} at a time, through "
                  + ("mitmdump + llm-ha" if args.proxy == "llm-ha" else "bare mitmdump"))
    primary_args = ("--no-physics", "--token-time", str(args.token_time), *SIM_QUIET)
    with (tempfile.TemporaryDirectory(prefix="llm-ha-soak-") as workdir,
          start_simulator("--no-physics", *SIM_QUIET) as fallback, start_simulator(*primary_args) as primary):
        profile = Path(workdir) / "profile.yaml"
        profile.write_text(PROFILE.format(fallback=fallback.url))
        with start_proxy(args.proxy, profile, primary.url, Path(workdir)) as proxy:
            soak = Soak(proxy, args.requests, args.concurrency, args.max_tokens)

            def say(sample: Sample) -> None:
                console.print(f"[dim]{sample.t_s:7.1f} s  {sample.requests_done:6d} done  {sample.errors} errors  "
                              f"RSS {sample.rss_mib:6.1f} MiB  {sample.fds:4d} fds  CPU {sample.cpu_pct:3.0f} %[/dim]")

            duration = asyncio.run(soak.run(args.sample_interval, say))
            result = summary(soak.samples, soak.answers, duration, inflight(proxy) if args.proxy == "llm-ha" else 0,
                             proc_status_kib(proxy.process.pid, "VmHWM"), args.max_tokens)
    console.print(samples_table(soak.samples))
    console.print(f"{result['requests']} requests in {result['duration_s']} s ({result['requests_per_s']}/s), "
                  f"TTFT p50 {result['ttft_p50_ms']} ms, p99 {result['ttft_p99_ms']} ms; "
                  f"peak RSS {result['peak_rss_mib']} MiB")
    console.print(targets_table(result))
    if result["first_error"]:
        console.print(f"[red]first client error:[/red] {result['first_error']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "sample_interval", "max_tokens",
                                                   "token_time")},
        "summary": result, "samples": [asdict(s) for s in soak.samples],
    }, indent=2))
    console.print(f"Results: {path}")


if __name__ == "__main__":
    main()
