"""Remake tests/data/sample-recording.flows: real llm-ha traffic with an ejection story in it.

    .venv/bin/python tests/data/make_sample_recording.py [OUT]

A real mitmdump with llm-ha (`-w OUT`, reverse mode) stands in front of two llmsim simulators: the
`primary` preset (physics of a 7B model on one GPU) and the `fallback` preset. Streamed chat requests
arrive evenly at RATE per second while the primary degrades by its `first_token_delay` switch:

    0 s    healthy                  first token in tens of ms
    3 s    +0.2 s first-token delay late, but under the 300 ms first-byte timeout: still served
    6 s    +0.45 s                  every attempt times out: failovers, the primary is ejected (k=1, 2 s),
                                    comes back, fails again, and is ejected again (k=2, 4 s)
    9.5 s  healthy again            it returns when its ejection ends and serves again
    14 s   two non-streamed requests, then the end

The profile (RECORDING_PROFILE) uses short durations (interval 500 ms, base ejection 2 s) so the story
fits in 14 s. The file stays under 300 KB (3-token answers, few headers). Timings vary from run to run; the
tests derive what they expect from the attempts in the file, not from this schedule.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from llmbench.proxy import start_mitmdump
from llmsim.control import start_simulator

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "sample-recording.flows"
RATE = 5.0
USAGE_EVERY = 5  # every 5th streamed request asks for a usage chunk (include_usage)
DURATION = 14.0
MAX_TOKENS = 3
FAULT_SCHEDULE = [(3.0, 0.2), (6.0, 0.45), (9.5, 0.0)]  # (seconds after the start, first_token_delay)
RECORDING_PROFILE = """\
first_byte_timeout: 300ms
request_timeout: 10s
health_check:
  failure_rate_threshold: 50
  interval: 500ms
  base_ejection_time: 2s
  max_ejection_time: 8s
  min_requests: 1
upstreams:
  - name: primary          # the reverse-proxy target
  - name: fallback
    nodes: ["{fallback}"]
    first_byte_timeout: 2s
"""


async def degrade(primary, schedule: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    for at, delay in schedule:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        await asyncio.to_thread(primary.set_faults, first_token_delay=delay)


async def chat(client: httpx.AsyncClient, stream: bool, usage: bool = False) -> str:
    """One chat completion through the proxy; the upstream that served it."""
    body = {"model": "DeepSeek-R1-Distill-Qwen-7B", "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": "Say something short."}]}
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_bytes():
            pass
        return response.headers.get("x-llm-ha-upstream", "none")


async def drive(proxy_url: str, primary) -> None:
    """Open loop: streamed requests at RATE per second, evenly spaced, never waiting for each other."""
    async with httpx.AsyncClient(base_url=proxy_url, timeout=20, headers={"user-agent": "llm-ha-sample"}) as client:
        start, tasks = time.monotonic(), []
        faults = asyncio.create_task(degrade(primary, FAULT_SCHEDULE))
        for i in range(int(DURATION * RATE)):
            await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            tasks.append(asyncio.create_task(chat(client, stream=True, usage=i % USAGE_EVERY == 0)))
        served = Counter(await asyncio.gather(*tasks))
        await faults
        served.update([await chat(client, stream=False) for _ in range(2)])
    print(f"{sum(served.values())} requests, served by {dict(served)}", file=sys.stderr)


def make(out: Path) -> Path:
    with start_simulator() as primary, start_simulator("--preset", "fallback") as fallback, \
            tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "recording-profile.yaml"
        profile.write_text(RECORDING_PROFILE.format(fallback=fallback.url))
        partial = Path(tmp) / "recording.flows"
        proxy = start_mitmdump(profile, primary.url, args=["-w", str(partial)], options={"flow_detail": 0})
        try:
            asyncio.run(drive(proxy.url, primary))
        finally:
            proxy.stop()
        out.write_bytes(partial.read_bytes())
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)", file=sys.stderr)
    return out


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
