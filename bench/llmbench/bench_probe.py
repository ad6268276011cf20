"""A primary that dies and stays down: how many real requests still reach it, with and without probing.

`make bench-probe` (about 1.5 minutes): a primary simulator and a fallback, mitmdump + llm-ha with the
reference settings scaled down (1 s intervals, base ejection 5 s), a steady 5 requests/s for 40 s; the
primary is crashed at 5 s and stays down (its restart takes 180 s). Run twice, the same load: probing
on (the default) and `probe: false` (0.1's blind return after k x base_ejection_time). Printed: the
client-visible failures, the ejections, and the real requests sent to the dead primary after its
first ejection (the primary node's attempts in `/status` then and at the end).

    python -m llmbench.bench_probe [--seconds 40] [--rate 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from llmsim.control import start_simulator

from .proxy import start_mitmdump

PROFILE = """
first_byte_timeout: 500ms
health_check: {{interval: 1s, base_ejection_time: 5s, max_ejection_time: 60s}}
{probe}
upstreams:
  - name: primary
  - name: fallback
    nodes: ["{fallback}"]
"""


async def load(url: str, seconds: float, rate: float) -> list[int]:
    statuses: list[int] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        async def one() -> None:
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                statuses.append(response.status_code)
            except httpx.HTTPError:
                statuses.append(0)

        tasks = []
        for _ in range(int(seconds * rate)):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return statuses


def run(probing: bool, seconds: float, rate: float, crash_at: float) -> dict:
    primary = start_simulator("--preset", "fallback", "--model", "primary-model", "--restart-time", "180")
    fallback = start_simulator("--preset", "fallback")
    folder = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    profile = folder / "profile.yaml"
    profile.write_text(PROFILE.format(fallback=fallback.url, probe="" if probing else "probe: false"))
    proxy = start_mitmdump(profile, primary.url)
    try:
        async def scenario() -> tuple[list[int], int | None]:
            loading = asyncio.create_task(load(proxy.url, seconds, rate))
            await asyncio.sleep(crash_at)
            primary.crash()
            at_first_ejection = None
            while not loading.done():
                node = (await asyncio.to_thread(proxy.node, "primary"))
                if at_first_ejection is None and node["ejections"] >= 1:
                    at_first_ejection = node["requests"]
                await asyncio.sleep(0.1)
            return await loading, at_first_ejection

        statuses, at_first = asyncio.run(scenario())
        node = proxy.node("primary")
        events = [e["action"] for e in proxy.status()["events"]]
        return {"probing": probing, "requests": len(statuses), "failures": sum(s != 200 for s in statuses),
                "ejections": node["ejections"], "k": node["k"],
                "after_first_ejection": node["requests"] - (at_first or node["requests"]),
                "holds": events.count("hold")}
    finally:
        proxy.stop()
        primary.stop()
        fallback.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmbench.bench_probe", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--rate", type=float, default=5.0, help="requests per second")
    p.add_argument("--crash-at", type=float, default=5.0)
    args = p.parse_args(argv)
    print(f"primary crashed at {args.crash_at:g} s and down for the rest; {args.rate:g} requests/s for {args.seconds:g} s; "
          f"interval 1 s, base ejection 5 s")
    started = time.monotonic()
    for probing in (True, False):
        r = run(probing, args.seconds, args.rate, args.crash_at)
        print(f"probing {'on ' if probing else 'off'}: {r['requests']} requests, {r['failures']} client-visible failures, "
              f"{r['ejections']} ejections (k now {r['k']}), {r['holds']} holds; real requests sent to the dead "
              f"primary after its first ejection: {r['after_first_ejection']}")
    print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
