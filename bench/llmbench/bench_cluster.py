"""bench-cluster: several llm-ha instances behind nginx round-robin, with and without shared state.

Three parts, each printing its figures:

1. **The spike through 4 instances** (`--instances`): bench-spike's seeded spike with `--load` (4) times
   its request rates, the primary simulator as in bench-spike (it crashes past ~51 sequences held,
   queued or running), the fixed cap `max_inflight: 16` on the primary. Without `shared_state` each
   instance caps the primary at 16 on its own (4 x 16 = 64 may reach it); with it the 16 is the
   cluster's. The primary's peak is sampled (`PeakSampler`: running + queued; the simulator's own
   `peak_batch` cannot pass its batch of 16). Run at `--scale` (default 4: the load takes four times
   as long at a quarter of the rate, every duration of the profile and the simulators times 4, the
   same experiment in the document's seconds) because the 2-core development machine cannot carry 56
   streamed requests a second through 4 proxies, nginx and the load generator: at scale 2 the
   proxies' own lag put TTFT p50 at ~260 ms.
2. **What Redis adds to the time to first token**, in one run: two instances in front of an ideal
   upstream (no delays), one with the budget in-process, one with it in Redis, and the same
   sequential streamed requests alternating between them. Also the lease round trip each instance
   measured (`shared_state.acquire_ms_p50/p99` in its /status).
3. **Throughput of 1, 2 and 4 instances** behind nginx with shared state, closed loop: `--clients`
   concurrent clients sending short streamed requests to an ideal upstream for `--seconds`.

Needs Debian's redis-server and nginx. About 13 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from llmsim.control import start_simulator
from llmsim.loadgen import percentile, run_load

from .cluster import LoadBalancer, RedisServer, nginx_binary, redis_binary, start_instances, wait_connected
from .scenario import DEFAULT_SEED, REFERENCE, VARIANTS, RunResult, SpikeLoad, profile_text, summarize_run

FIXED_CAP = VARIANTS["fixed-cap"]


def spike(instances: int, shared: bool, load_factor: float, scale: float, seed: int, workdir: Path) -> dict:
    """One spike run through `instances` llm-ha instances behind nginx; bench-spike's summary of it."""
    load = SpikeLoad(steady_rate=SpikeLoad.steady_rate * load_factor, spike_rate=SpikeLoad.spike_rate * load_factor)
    folder = workdir / f"spike-{'shared' if shared else 'alone'}"
    folder.mkdir(parents=True, exist_ok=True)
    sim_args = ("--time-scale", f"{scale:g}", "--seed", str(seed), "--log-level", "WARNING")
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer.start())
        primary = stack.enter_context(start_simulator("--preset", "primary", *sim_args))
        fallback = stack.enter_context(start_simulator("--preset", "fallback", *sim_args))
        profile = folder / "spike.yaml"
        text = profile_text(FIXED_CAP, scale, fallback.url)
        profile.write_text((f'shared_state: "{redis.url}"\n' if shared else "") + text)
        proxies = []
        stack.callback(lambda: [p.stop() for p in proxies])
        for i in range(instances):
            proxies += start_instances(profile, 1, primary.url, options={
                "llm_ha_events": str(folder / f"events-{i}.jsonl"), "flow_detail": 0, "termlog_verbosity": "warn"})
        if shared:
            wait_connected(proxies)
        balancer = stack.enter_context(LoadBalancer.start([p.port for p in proxies], folder))
        peak = stack.enter_context(PeakSampler(primary))
        t0 = time.time()
        records = asyncio.run(run_load(load.phases(scale), f"{balancer.url}/v1", seed, max_tokens=load.max_tokens))
        t_end = time.time()
        time.sleep(1.0)
        statuses = [p.status() for p in proxies]
        primary_stats, fallback_stats = primary.stats(), fallback.stats()
    events = [json.loads(line) for i in range(instances)
              for line in (folder / f"events-{i}.jsonl").read_text().splitlines() if line.strip()]
    result = RunResult(variant=FIXED_CAP, scale=scale, seed=seed, load=load, t0=t0, t_end=t_end, records=records,
                       primary_stats=primary_stats, fallback_stats=fallback_stats, events=events,
                       restart_s=REFERENCE.restart_time * scale,
                       first_byte_timeout_s=REFERENCE.first_byte_timeout * scale)
    summary = summarize_run(result)
    summary["shared"] = shared
    summary["primary_peak_inflight"] = peak.peak
    summary["eject_events"] = sum(1 for e in events if e["action"] == "eject" and e["upstream"] == "primary")
    summary["instances"] = instances
    summary["acquire_ms"] = [(s.get("shared_state") or {}).get("acquire_ms_p50") for s in statuses]
    summary["loop_lag_ms"] = [s.get("proxy", {}).get("loop_lag_ms") for s in statuses]
    summary["requests_per_instance"] = [
        sum(n["requests"] + n["shed"] for u in s["upstreams"] for n in u["nodes"]) for s in statuses]
    return summary


class PeakSampler:
    """The most requests the primary held at once (running + queued), sampled every 20 ms in a thread.

    The simulator's own `peak_batch` cannot pass its batch size (16); what crashes it is everything it
    holds, queued or running (about 51 sequences' memory)."""

    def __init__(self, primary) -> None:
        self.primary = primary
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(Exception):
                stats = self.primary.stats()
                self.peak = max(self.peak, stats["running"] + stats["queued"])


def added_ttft(requests: int, workdir: Path) -> dict:
    """TTFT through an in-process instance and a Redis-backed one, alternating, in the same run."""
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer.start())
        upstream = stack.enter_context(start_simulator("--no-physics", "--log-level", "WARNING"))
        fallback = stack.enter_context(start_simulator("--no-physics", "--preset", "fallback", "--log-level", "WARNING"))
        body = (f"first_byte_timeout: 2s\nupstreams:\n  - name: primary\n    max_inflight: 16\n"
                f"  - name: fallback\n    nodes: [\"{fallback.url}\"]\n")
        alone, shared = workdir / "alone.yaml", workdir / "shared.yaml"
        alone.write_text(body)
        shared.write_text(f'shared_state: "{redis.url}"\n' + body)
        proxies = []
        stack.callback(lambda: [p.stop() for p in proxies])
        options = {"flow_detail": 0, "termlog_verbosity": "warn"}
        proxies += start_instances(alone, 1, upstream.url, options=options)
        proxies += start_instances(shared, 1, upstream.url, options=options)
        wait_connected(proxies[1:])
        ttfts = asyncio.run(_alternate([p.url for p in proxies], requests))
        lease = proxies[1].status()["shared_state"]
    result = {"requests_each": requests}
    for name, values in zip(("in_process", "redis"), ttfts):
        result[name] = {"p50_ms": _ms(percentile(values, 50)), "p95_ms": _ms(percentile(values, 95))}
    result["added_p50_ms"] = round(result["redis"]["p50_ms"] - result["in_process"]["p50_ms"], 2)
    result["added_p95_ms"] = round(result["redis"]["p95_ms"] - result["in_process"]["p95_ms"], 2)
    result["lease_round_trip_ms"] = {"p50": lease.get("acquire_ms_p50"), "p99": lease.get("acquire_ms_p99")}
    return result


async def _alternate(urls: list[str], requests: int) -> list[list[float]]:
    ttfts: list[list[float]] = [[] for _ in urls]
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(requests * len(urls)):
            which = i % len(urls)
            ttft = await _stream(client, urls[which], 16)
            if i >= 2 * len(urls):  # warm-up: connections, the first lease script load
                ttfts[which].append(ttft)
    return ttfts


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": max_tokens}
    start = time.monotonic()
    ttft = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for _ in response.aiter_raw():
            if ttft is None:
                ttft = time.monotonic() - start
    return ttft


def throughput(instances: int, clients: int, seconds: float, workdir: Path) -> dict:
    """Closed loop through nginx: completed streamed requests per second with `instances` instances."""
    folder = workdir / f"throughput-{instances}"
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer.start())
        upstream = stack.enter_context(start_simulator("--no-physics", "--log-level", "WARNING"))
        fallback = stack.enter_context(start_simulator("--no-physics", "--preset", "fallback", "--log-level", "WARNING"))
        profile = folder / "throughput.yaml"
        profile.write_text(f'shared_state: "{redis.url}"\nfirst_byte_timeout: 5s\nupstreams:\n  - name: primary\n'
                           f'    max_inflight: 64\n  - name: fallback\n    nodes: ["{fallback.url}"]\n')
        proxies = []
        stack.callback(lambda: [p.stop() for p in proxies])
        proxies += start_instances(profile, instances, upstream.url,
                                   options={"flow_detail": 0, "termlog_verbosity": "warn"})
        wait_connected(proxies)
        balancer = stack.enter_context(LoadBalancer.start([p.port for p in proxies], folder))
        done, errors = asyncio.run(_closed_loop(balancer.url, clients, seconds))
    return {"instances": instances, "clients": clients, "seconds": seconds, "completed": done, "errors": errors,
            "requests_per_s": round(done / seconds, 1)}


async def _closed_loop(url: str, clients: int, seconds: float) -> tuple[int, int]:
    counts = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def one_client() -> None:
            while time.monotonic() < deadline:
                try:
                    await _stream(client, url, 8)
                    counts["ok"] += 1
                except httpx.HTTPError:
                    counts["error"] += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return counts["ok"], counts["error"]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def print_spike(summary: dict) -> None:
    label = f"{summary['instances']} instances, {'shared_state' if summary['shared'] else 'each on its own'}"
    print(f"  {label:<36} requests {summary['requests']:>5}  failed {summary['failed']:>4}  "
          f"primary crashes {summary['primary_crashes']}  primary peak in flight {summary['primary_peak_inflight']:>3}  "
          f"eject events {summary['eject_events']:>2}  "
          f"served by primary {summary['by_primary']:>4}  TTFT p50/p95 {summary['ttft_p50_ms']}/{summary['ttft_p95_ms']} ms  "
          f"per instance {summary['requests_per_instance']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmbench.bench_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--load", type=float, default=4.0, help="times bench-spike's request rates; default 4")
    p.add_argument("--scale", type=float, default=4.0, help="time scale of the spike runs; default 4")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--requests", type=int, default=300, help="per instance in the added-TTFT run")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients in the throughput runs")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each throughput run")
    p.add_argument("--only", choices=("spike", "ttft", "throughput"), action="append")
    p.add_argument("--out", default="out/bench-cluster", help="where the runs' files and results.json go")
    args = p.parse_args(argv)
    missing = [name for name, found in (("redis-server", redis_binary()), ("nginx", nginx_binary())) if not found]
    if missing:
        sys.exit(f"bench-cluster needs {' and '.join(missing)} (Debian: apt-get install -y {' '.join(missing)})")
    parts = args.only or ["spike", "ttft", "throughput"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpus": os.cpu_count(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="llm-ha-bench-cluster-", dir=out) as scratch:
        workdir = Path(scratch)
        if "spike" in parts:
            print(f"1. the spike x{args.load:g} through {args.instances} instances behind nginx round-robin, "
                  f"max_inflight 16 on the primary, time scale {args.scale:g}:", flush=True)
            results["spike"] = []
            for shared in (False, True):
                summary = spike(args.instances, shared, args.load, args.scale, args.seed, workdir)
                results["spike"].append(summary)
                print_spike(summary)
        if "ttft" in parts:
            print(f"2. time to first token, budget in-process vs in Redis, {args.requests} requests each, "
                  "alternating:", flush=True)
            results["ttft"] = added_ttft(args.requests, workdir)
            t = results["ttft"]
            print(f"  in-process p50/p95 {t['in_process']['p50_ms']}/{t['in_process']['p95_ms']} ms; Redis "
                  f"{t['redis']['p50_ms']}/{t['redis']['p95_ms']} ms; added {t['added_p50_ms']}/{t['added_p95_ms']} ms; "
                  f"lease round trip p50/p99 {t['lease_round_trip_ms']['p50']}/{t['lease_round_trip_ms']['p99']} ms",
                  flush=True)
        if "throughput" in parts:
            print(f"3. throughput behind nginx with shared_state, {args.clients} clients, closed loop, "
                  f"{args.seconds:g} s each ({os.cpu_count()} CPUs, shared with the clients and the upstreams):",
                  flush=True)
            results["throughput"] = []
            for n in (1, 2, 4):
                row = throughput(n, args.clients, args.seconds, workdir)
                results["throughput"].append(row)
                print(f"  {n} instance{'s' * (n > 1)}: {row['requests_per_s']} requests/s "
                      f"({row['completed']} completed, {row['errors']} errors)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
