"""An open-loop load generator for OpenAI-compatible chat completion endpoints.

Open loop: requests are launched on a schedule fixed in advance (seeded Poisson or evenly spaced
arrivals, phase by phase) and never wait for each other, so a slow server gets more concurrent
requests, as it would from real users, instead of fewer.

    python -m llmsim.loadgen --base-url http://127.0.0.1:8080/v1 --phases "steady=10:2,spike=20:12,20:2" \\
        --seed 1 --out records.jsonl

Every request streams through the real `openai` client (no retries) and leaves one `Record`. The
function API is `run_load(phases, base_url, seed, ...)`; `summarize(records)` gives counts and TTFT
percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import openai

from .server import expected_answer

DEFAULT_MODEL = "DeepSeek-R1-Distill-Qwen-7B"
UPSTREAM_HEADER = "x-llm-ha-upstream"
ATTEMPTS_HEADER = "x-llm-ha-attempts"
PROMPT_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "gateway", "keeps", "the", "service", "alive"]  # noqa: E501


@dataclass(frozen=True)
class Phase:
    """`duration` seconds of arrivals at `rate` requests per second."""

    duration: float
    rate: float
    name: str = ""


def parse_phases(spec: str) -> list[Phase]:
    """"10:2,spike=20:12,20:2" -> phases; a phase is [NAME=]SECONDS:RATE, unnamed ones get "phaseN"."""
    phases = []
    for index, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, _, timing = part.rpartition("=")
        try:
            duration, rate = (float(x) for x in timing.split(":"))
        except ValueError:
            raise ValueError(f"bad phase {part!r}: expected [NAME=]SECONDS:RATE, e.g. spike=20:12") from None
        if duration <= 0 or rate < 0:
            raise ValueError(f"bad phase {part!r}: needs SECONDS > 0 and RATE >= 0")
        phases.append(Phase(duration, rate, name or f"phase{index + 1}"))
    if not phases:
        raise ValueError("no phases given")
    return phases


def arrival_schedule(phases: Iterable[Phase], seed: int = 0, arrivals: str = "poisson") -> list[tuple[float, str]]:
    """(seconds after the start, phase name) of every request, in order; unnamed phases are "phaseN"."""
    if arrivals not in ("poisson", "uniform"):
        raise ValueError(f"arrivals must be poisson or uniform, not {arrivals!r}")
    rng = random.Random(seed)
    schedule, phase_start = [], 0.0
    for index, phase in enumerate(phases):
        name, end = phase.name or f"phase{index + 1}", phase_start + phase.duration
        if phase.rate > 0 and arrivals == "poisson":
            t = phase_start + rng.expovariate(phase.rate)
            while t < end:
                schedule.append((t, name))
                t += rng.expovariate(phase.rate)
        elif phase.rate > 0:
            count = math.floor(phase.duration * phase.rate + 1e-9)
            schedule.extend((phase_start + k / phase.rate, name) for k in range(count))
        phase_start = end
    return schedule


@dataclass
class Record:
    """One request. Times are unix seconds; `ttft` is seconds from `start` to the first content chunk."""

    id: int
    phase: str
    scheduled: float
    start: float
    ttft: float | None = None
    end: float | None = None
    outcome: str = "pending"  # "ok", "incomplete" (no finish_reason, or not the whole answer), or ErrorClass[:status]
    status: int | None = None
    upstream: str | None = None  # the x-llm-ha-upstream header, else the model named in the chunks
    model: str | None = None
    chunks: int = 0
    attempts: int | None = None
    error: str | None = None
    complete: bool | None = None  # the content is exactly the simulators' answer to the request

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def prompt_for(request_id: int, words: int) -> str:
    body = " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(words))
    return f"Request {request_id}: {body}"


async def send_one(client: openai.AsyncOpenAI, record: Record, model: str, max_tokens: int, prompt: str) -> Record:
    """Stream one chat completion into `record`; never raises for what the server or network does."""
    record.start = time.time()
    finish_reason = None
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    content = []
    try:
        async with client.chat.completions.with_streaming_response.create(stream=True, **body) as response:
            _note_response(record, response.status_code, response.headers)
            async for chunk in await response.parse():
                record.chunks += 1
                record.model = chunk.model or record.model
                choice = chunk.choices[0] if chunk.choices else None
                if choice and choice.delta and choice.delta.content:
                    content.append(choice.delta.content)
                    if record.ttft is None:
                        record.ttft = time.time() - record.start
                finish_reason = (choice and choice.finish_reason) or finish_reason
        record.complete = "".join(content) == expected_answer(body)
        record.outcome = "ok" if finish_reason and record.complete else "incomplete"
    except openai.APIStatusError as exc:
        _note_response(record, exc.status_code, exc.response.headers)
        record.outcome = f"{type(exc).__name__}:{exc.status_code}"
        record.error = str(exc)[:300]
    except Exception as exc:  # connection errors, timeouts, in-band errors, broken streams
        record.outcome = type(exc).__name__
        record.error = (str(exc) or repr(exc))[:300]
    record.end = time.time()
    if record.upstream is None:
        record.upstream = record.model
    return record


def _note_response(record: Record, status: int, headers) -> None:
    record.status = status
    record.upstream = headers.get(UPSTREAM_HEADER) or record.upstream
    attempts = headers.get(ATTEMPTS_HEADER)
    if attempts and attempts.isdigit():
        record.attempts = int(attempts)


async def run_load(
    phases: list[Phase],
    base_url: str,
    seed: int = 0,
    *,
    max_tokens: int = 32,
    model: str = DEFAULT_MODEL,
    api_key: str = "sk-llmsim",
    timeout: float = 60.0,
    arrivals: str = "poisson",
    prompt_words: int = 20,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Send the whole schedule to `base_url` (ending in /v1) and return the records, by id.

    `on_record` is called as each request finishes (for live progress or streaming to a file).
    """
    schedule = arrival_schedule(phases, seed, arrivals)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []

    async def launch(record: Record) -> Record:
        await send_one(client, record, model, max_tokens, prompt_for(record.id, prompt_words))
        if on_record is not None:
            on_record(record)
        return record

    try:
        start_mono, start_wall = loop.time(), time.time()
        for request_id, (offset, phase) in enumerate(schedule):
            await asyncio.sleep(max(0.0, start_mono + offset - loop.time()))
            record = Record(id=request_id, phase=phase, scheduled=start_wall + offset, start=time.time())
            tasks.append(asyncio.create_task(launch(record)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await client.close()


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: list[Record]) -> dict:
    """Counts by outcome and upstream, TTFT percentiles of the requests that got a first token."""
    ttfts = [r.ttft for r in records if r.ttft is not None]
    lags = [r.start - r.scheduled for r in records]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "requests": len(records),
        "ok": sum(r.ok for r in records),
        "outcomes": dict(Counter(r.outcome for r in records)),
        "upstreams": dict(Counter(r.upstream or "none" for r in records)),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p95_ms": ms(percentile(ttfts, 95)),
        "ttft_max_ms": ms(max(ttfts, default=None)),
        "start_lag_max_ms": ms(max(lags, default=None)),
    }


def write_records(records: Iterable[Record], path: str) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")


def read_records(path: str) -> list[Record]:
    with open(path) as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmsim.loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", required=True, help="the API base URL, ending in /v1")
    p.add_argument("--phases", default="10:2,20:12,20:2", help="[NAME=]SECONDS:RATE,...")
    p.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model named in the requests")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "sk-llmsim"))
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--out", help="write one JSON record a line here")
    p.add_argument("--quiet", action="store_true", help="no line per finished request on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        phases = parse_phases(args.phases)
    except ValueError as exc:
        sys.exit(f"loadgen: {exc}")

    def progress(r: Record) -> None:
        if not args.quiet:
            ttft = "-" if r.ttft is None else f"{r.ttft * 1000:.0f}ms"
            print(f"#{r.id} {r.phase} {r.outcome} ttft={ttft} upstream={r.upstream}", file=sys.stderr)

    records = asyncio.run(run_load(
        phases, args.base_url, args.seed, max_tokens=args.max_tokens, model=args.model, api_key=args.api_key,
        timeout=args.timeout, arrivals=args.arrivals, prompt_words=args.prompt_words, on_record=progress,
    ))
    if args.out:
        write_records(records, args.out)
    print(json.dumps(summarize(records)))


if __name__ == "__main__":
    main()
