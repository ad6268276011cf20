"""What llm-ha costs on the data path, next to mitmproxy's own cost: `make bench-overhead`.

Three paths to the same simulated upstream (`python -m llmsim.server --no-physics`, paced with
`--token-time` where a figure needs it), measured in interleaved rounds (direct, mitmdump, llm-ha,
then llm-ha, mitmdump, direct, and so on: neither proxy always follows the other):

* direct: the client talks to the simulator;
* mitmdump: bare mitmdump as a reverse proxy, no addon (`stream_large_bodies=1`, or it would hold
  each answer until it is complete);
* llm-ha: mitmdump with `-s addons/llm_ha.py` and a profile (primary = the reverse target, plus a
  fallback, both with `resume: prefill`: mid-stream continuation on, so every stream is watched as
  continuation needs). No `stream_large_bodies`: llm-ha streams by itself, and with it every
  request's body went upstream twice.

The parts (`--only`, comma-separated):

* per-chunk: proxy CPU per 1,000 streamed chunks, one paced stream of 1,000 tokens, and 20 streams
  of 1,000 tokens as fast as the path delivers them (tokens/s delivered, proxy CPU %);
* sweep: 50 / 100 / 200 streams held open at once, each one answer of 200 tokens at 20 tokens/s,
  started evenly over the first second: TTFT p50/p99, inter-token gap p99, proxy CPU %, errors;
* per-request: short streamed requests (16 tokens) one after another on a keep-alive connection:
  TTFT, the TTFT each proxy adds to the direct path's, proxy CPU per request; 9 rounds (a round takes
  about a second; on 2 cores shared by client, proxy and simulator, a round's figure depends on where
  the scheduler puts the three, and 3 rounds made the median a coin toss);
* startup: from launching mitmdump (bare, or with llm-ha and a profile) to the first proxied answer
  (llm-ha's modules compiled to bytecode first, as an installed package has them).

Each figure is printed as the median over the rounds with [min-max], and as the ratio llm-ha /
mitmdump (the median of the per-round ratios, [min-max]); then the issue's targets, the proxies'
peak RSS and how noisy the machine was (the spread of the rounds, and the CPU that other processes
used meanwhile). The results also go to out/bench-overhead/ as JSON.

The client is a small asyncio HTTP/1.1 client (`RawConnection`) that counts SSE events without
decoding them, so that on a 2-core machine its own CPU stays small next to the proxy's. Proxy CPU is
read from /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts 10 ms ticks).

    python -m llmbench.bench_overhead [--quick] [--only per-chunk,sweep,per-request,startup] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import itertools
import json
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from llmsim.control import start_simulator

from .peers import cpu_seconds
from .proxy import REPO, MitmProcess, start_mitmdump

PATHS = ("direct", "mitmdump", "llm-ha")
PROXIES = PATHS[1:]
PARTS = ("per-chunk", "sweep", "per-request", "startup", "protocols")
OUT_DIR = REPO / "out" / "bench-overhead"
SIM_QUIET = ("--log-level", "WARNING")
REQUEST_TIMEOUT = 120.0  # s: one answer, however slow the path under load

PROFILE = """\
first_byte_timeout: 10s   # generous: the benchmark measures the data path, failovers would blur it
upstreams:
  - name: primary
    protocols: [openai, anthropic, responses, ollama]
    resume: prefill
  - name: fallback
    nodes: ["{fallback}"]
    protocols: [openai, anthropic, responses, ollama]
    resume: prefill
"""
BARE_SCRIPT = '"""No addon: start_mitmdump always loads a script, this one does nothing."""\n'


# -- sizes

@dataclass(frozen=True)
class Sizes:
    rounds: int = 3
    startup_rounds: int = 5
    chunk_tokens: int = 1000
    chunk_token_time: float = 0.005  # s between the paced stream's tokens
    chunk_streams: int = 20
    sweep_streams: tuple[int, ...] = (50, 100, 200)
    sweep_tokens: int = 200
    sweep_rate: float = 20.0  # tokens/s of each stream
    sweep_ramp: float = 1.0  # s over which a level's streams start
    sweep_waves: int = 1  # answers each stream asks for, one after the other (closed loop)
    requests: int = 300
    request_rounds: int = 9  # rounds of the per-request part (each about a second per path)
    max_tokens: int = 16
    protocol_requests: int = 100  # per API: sequential short requests for the added TTFT
    protocol_tokens: int = 400  # per API: one paced stream for the CPU per chunk


FULL = Sizes()
QUICK = Sizes(rounds=2, startup_rounds=2, request_rounds=2, chunk_tokens=100, chunk_token_time=0.002, chunk_streams=4,
              sweep_streams=(5, 10), sweep_tokens=10, sweep_rate=50.0, sweep_ramp=0.1, requests=20,
              protocol_requests=10, protocol_tokens=50)


# -- the client

@dataclass
class Answer:
    """One streamed answer as the client saw it; times in seconds from `started` (perf_counter)."""

    started: float
    first_token: float | None = None
    tokens: int = 0
    token_times: list[float] | None = None  # kept when gaps are wanted
    complete: bool = False  # `data: [DONE]` arrived and the HTTP message ended
    upstream: str | None = None  # x-llm-ha-upstream
    error: str | None = None
    duration: float = 0.0

    def gaps(self) -> list[float]:
        times = self.token_times or []
        return [later - earlier for earlier, later in itertools.pairwise(times)]


@dataclass(frozen=True)
class Wire:
    """One API's streamed answer, as the light client reads it: where to ask, how events are separated,
    what marks a token and what marks the end."""

    path: str
    body: Callable[[int], dict]
    separator: bytes
    token: bytes
    ends: tuple[bytes, ...]


HI = [{"role": "user", "content": "hi"}]
WIRES = {
    "openai": Wire("/v1/chat/completions", lambda n: {"model": "bench", "messages": HI, "stream": True, "max_tokens": n},
                   b"\n\n", b'"content"', (b"data: [DONE]",)),
    "anthropic": Wire("/v1/messages", lambda n: {"model": "bench", "messages": HI, "stream": True, "max_tokens": n},
                      b"\n\n", b'"text_delta"', (b"event: message_stop",)),
    "responses": Wire("/v1/responses", lambda n: {"model": "bench", "input": "hi", "stream": True, "max_output_tokens": n},
                      b"\n\n", b"event: response.output_text.delta",
                      (b"event: response.completed", b"event: response.incomplete")),
    "ollama": Wire("/api/chat", lambda n: {"model": "bench", "messages": HI, "stream": True, "options": {"num_predict": n}},
                   b"\n", b'"done":false', (b'"done":true',)),
}
CHAT = WIRES["openai"]


def stream_request(host: str, max_tokens: int, wire: Wire = CHAT) -> bytes:
    body = json.dumps(wire.body(max_tokens)).encode()
    head = (f"POST {wire.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class RawConnection:
    """One keep-alive HTTP/1.1 connection for streamed chat completions; reconnects after an error.

    SSE events are split on blank lines and counted, not decoded: an event with `"content"` is a token.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.wire = CHAT
        self._pending = b""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def stream(self, request: bytes, timeout: float = REQUEST_TIMEOUT, keep_times: bool = False,
                     wire: Wire = CHAT) -> Answer:
        """Send `request`, read the whole answer; the time to first token includes connecting, if needed."""
        answer = Answer(time.perf_counter(), token_times=[] if keep_times else None)
        self.wire = wire
        keep_alive = False
        try:
            async with asyncio.timeout(timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(request)
                keep_alive = await self._read_response(answer)
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            answer.error = answer.error or f"{type(exc).__name__}: {exc}"[:200]
        answer.duration = time.perf_counter() - answer.started
        if answer.error is None and not answer.complete:
            answer.error = f"the stream ended without {wire.ends[0].decode()}"
        if not keep_alive or answer.error:
            await self.close()
        return answer

    async def _read_response(self, answer: Answer) -> bool:
        """Read one response into `answer`; whether the connection may be reused."""
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        answer.upstream = headers.get("x-llm-ha-upstream")
        self._pending = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self._read_chunked(answer)
            keep_alive = headers.get("connection", "").lower() != "close"
        elif "content-length" in headers:
            self._feed(answer, await self.reader.readexactly(int(headers["content-length"])))
            keep_alive = headers.get("connection", "").lower() != "close"
        else:  # the body ends with the connection
            self._feed(answer, await self.reader.read())
            keep_alive = False
        if status != 200:
            answer.error = f"HTTP {status}"
        return keep_alive

    async def _read_chunked(self, answer: Answer) -> None:
        reader = self.reader
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                    pass
                return
            self._feed(answer, (await reader.readexactly(size + 2))[:-2])

    def _feed(self, answer: Answer, data: bytes) -> None:
        wire = self.wire
        *events, self._pending = (self._pending + data).split(wire.separator)
        if not events:
            return
        now = time.perf_counter() - answer.started
        for event in events:
            if wire.token in event:
                answer.tokens += 1
                if answer.first_token is None:
                    answer.first_token = now
                if answer.token_times is not None:
                    answer.token_times.append(now)
            elif any(end in event for end in wire.ends):
                answer.complete = True


# -- processes and measurements

def proxy_cpu_seconds(pid: int) -> float:
    """On-CPU seconds of every live thread of `pid`, from the scheduler's nanosecond counters."""
    total, seen = 0, False
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(task.path, "schedstat").read_text().split()[0])
                seen = True
    return total / 1e9 if seen else cpu_seconds(pid)


def proc_status_kib(pid: int, key: str) -> int:
    """A `key:` line of /proc/PID/status in KiB (VmRSS, VmHWM); 0 if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one (inherited by the processes we start): at 200
    streams llm-ha holds about 800 sockets, near the common soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Target:
    """Where a path's client connects, and the proxy process to watch (None: direct)."""

    path: str
    host: str
    port: int
    pid: int | None

    @classmethod
    def of(cls, path: str, url: str, pid: int | None) -> Target:
        parts = urlsplit(url)
        return cls(path, parts.hostname, parts.port, pid)

    def cpu(self) -> float:
        return proxy_cpu_seconds(self.pid) if self.pid else 0.0

    def request(self, max_tokens: int, wire: Wire = CHAT) -> bytes:
        return stream_request(f"{self.host}:{self.port}", max_tokens, wire)


class Machine:
    """How busy the machine was with other work: its busy CPU time minus ours, over the run."""

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self.started = time.monotonic()
        self.busy_start = self._busy_seconds()
        self.load_start = os.getloadavg()
        self.ours = 0.0  # CPU seconds of the processes we started and stopped

    @staticmethod
    def _busy_seconds() -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def account(self, pid: int) -> None:
        self.ours += cpu_seconds(pid)

    def report(self) -> dict:
        wall = time.monotonic() - self.started
        own = sum(os.times()[:2])
        others = max(0.0, self._busy_seconds() - self.busy_start - self.ours - own)
        return {"cpus": self.cpus, "wall_s": round(wall, 1), "load_before": self.load_start,
                "load_after": os.getloadavg(), "other_cpu_pct": round(100 * others / (wall * self.cpus), 1),
                "client_cpu_s": round(own, 2)}


@contextlib.contextmanager
def simulator(machine: Machine, *args: str) -> Iterator:
    with start_simulator(*args, *SIM_QUIET) as sim:
        try:
            yield sim
        finally:
            machine.account(sim.process.pid)


def launch_proxy(path: str, upstream: str, fallback: str, workdir: Path, wait: bool = True) -> MitmProcess:
    """bare mitmdump (`path` "mitmdump") or mitmdump with llm-ha, reverse proxy to `upstream`."""
    options = {"flow_detail": 0, "termlog_verbosity": "warn"}
    log_path = str(workdir / f"{path}-{time.monotonic_ns()}.log")
    confdir = str(workdir / "mitmproxy-conf")
    if path == "mitmdump":
        options["stream_large_bodies"] = "1"
        script = workdir / "bare.py"
        script.write_text(BARE_SCRIPT)
        return start_mitmdump(None, reverse=upstream, options=options, status=False, confdir=confdir,
                              log_path=log_path, script=script, wait=wait)
    profile = workdir / "llm-ha-profile.yaml"
    profile.write_text(PROFILE.format(fallback=fallback))
    return start_mitmdump(profile, reverse=upstream, options=options, status=False, confdir=confdir,
                          log_path=log_path, wait=wait)


def stop_proxy(machine: Machine, proxy: MitmProcess) -> None:
    machine.account(proxy.process.pid)
    proxy.stop()
    with contextlib.suppress(OSError):
        os.unlink(proxy.log_path)


@contextlib.contextmanager
def three_paths(machine: Machine, upstream: str, fallback: str, workdir: Path) -> Iterator[list[Target]]:
    """The direct path and the two proxies in front of `upstream`, for one part of the benchmark."""
    started: list[MitmProcess] = []
    try:
        targets = [Target.of("direct", upstream, None)]
        for path in PROXIES:
            started.append(launch_proxy(path, upstream, fallback, workdir))
            targets.append(Target.of(path, started[-1].url, started[-1].process.pid))
        yield targets
    finally:
        for proxy in started:
            stop_proxy(machine, proxy)


async def run_streams(target: Target, streams: int, tokens: int, *, delays: list[float] | None = None,
                      waves: int = 1, keep_times: bool = False, wire: Wire = CHAT) -> list[Answer]:
    """`streams` connections, each asking for `waves` answers of `tokens` tokens one after the other."""
    request = target.request(tokens, wire)

    async def one(delay: float) -> list[Answer]:
        await asyncio.sleep(delay)
        connection = RawConnection(target.host, target.port)
        try:
            return [await connection.stream(request, keep_times=keep_times, wire=wire) for _ in range(waves)]
        finally:
            await connection.close()

    done = await asyncio.gather(*(one(delays[i] if delays else 0.0) for i in range(streams)))
    return [answer for answers in done for answer in answers]


def problems(answers: list[Answer], tokens: int) -> int:
    """Answers with an error, or short, or from another upstream than the primary."""
    return sum(1 for a in answers if a.error or a.tokens != tokens or a.upstream not in (None, "primary"))


def first_error(answers: list[Answer]) -> str | None:
    return next((a.error or f"{a.tokens} tokens, upstream {a.upstream}" for a in answers
                 if a.error or a.upstream not in (None, "primary")), None)


def measured(target: Target, run: Coroutine[None, None, list[Answer]]) -> tuple[list[Answer], float, float]:
    """(answers, wall seconds, proxy CPU seconds) of one run of the client coroutine `run`."""
    cpu, start = target.cpu(), time.perf_counter()
    answers = asyncio.run(run)
    return answers, time.perf_counter() - start, target.cpu() - cpu


# -- the parts; each adds its figures, one value per round and path, to a Results

Figures = dict[str, dict[str, list[float]]]  # figure -> path -> [value per round]


class Results:
    def __init__(self) -> None:
        self.figures: Figures = {}
        self.errors: dict[str, list[str]] = {}  # the first error of each failing run
        self.peak_rss_kib: dict[str, dict[str, int]] = {}  # part -> proxy -> VmHWM

    def add(self, figure: str, path: str, value: float) -> None:
        self.figures.setdefault(figure, {}).setdefault(path, []).append(value)

    def error(self, where: str, answers: list[Answer]) -> None:
        if (message := first_error(answers)) is not None:
            self.errors.setdefault(where, []).append(message)

    def note_rss(self, part: str, targets: list[Target]) -> None:
        self.peak_rss_kib[part] = {t.path: proc_status_kib(t.pid, "VmHWM") for t in targets if t.pid}


def interleaved(rounds: int, targets: list[Target]) -> Iterator[tuple[int, Target]]:
    """Every target once per round; every other round in the reverse order."""
    for round_ in range(rounds):
        for target in targets if round_ % 2 == 0 else targets[::-1]:
            yield round_, target


def warm_up(targets: list[Target], max_tokens: int = 4) -> None:
    """One short answer on each path: imports, pools and caches, not counted."""
    for target in targets:
        asyncio.run(run_streams(target, 2, max_tokens))


def part_per_chunk(sizes: Sizes, results: Results, machine: Machine, fallback: str, workdir: Path) -> None:
    tokens = sizes.chunk_tokens
    paced = ("--no-physics", "--token-time", str(sizes.chunk_token_time), "--max-output-tokens", str(tokens))
    with simulator(machine, *paced) as sim, three_paths(machine, sim.url, fallback, workdir) as targets:
        warm_up(targets)
        for _, target in interleaved(sizes.rounds, targets):
            answers, wall, cpu = measured(target, run_streams(target, 1, tokens))
            results.add("paced_tokens_per_s", target.path, answers[0].tokens / wall)
            if target.pid:
                results.add("paced_cpu_ms_per_1k", target.path, 1e6 * cpu / max(1, answers[0].tokens))
            results.add("paced_errors", target.path, problems(answers, tokens))
            results.error(f"per-chunk paced, {target.path}", answers)
        results.note_rss("per-chunk paced", targets)
    fast = ("--no-physics", "--max-output-tokens", str(tokens))
    with simulator(machine, *fast) as sim, three_paths(machine, sim.url, fallback, workdir) as targets:
        warm_up(targets)
        for _, target in interleaved(sizes.rounds, targets):
            answers, wall, cpu = measured(target, run_streams(target, sizes.chunk_streams, tokens))
            delivered = sum(a.tokens for a in answers)
            results.add("fast_tokens_per_s", target.path, delivered / wall)
            if target.pid:
                results.add("fast_cpu_ms_per_1k", target.path, 1e6 * cpu / max(1, delivered))
                results.add("fast_cpu_pct", target.path, 100 * cpu / wall)
            results.add("fast_errors", target.path, problems(answers, tokens))
            results.error(f"per-chunk fast, {target.path}", answers)
        results.note_rss("per-chunk fast", targets)


def part_sweep(sizes: Sizes, results: Results, machine: Machine, fallback: str, workdir: Path) -> None:
    tokens = sizes.sweep_tokens
    paced = ("--no-physics", "--token-time", str(1 / sizes.sweep_rate), "--max-output-tokens", str(tokens))
    with simulator(machine, *paced) as sim, three_paths(machine, sim.url, fallback, workdir) as targets:
        warm_up(targets)
        for streams in sizes.sweep_streams:
            delays = [sizes.sweep_ramp * i / streams for i in range(streams)]
            for _, target in interleaved(sizes.rounds, targets):
                answers, wall, cpu = measured(target, run_streams(
                    target, streams, tokens, delays=delays, waves=sizes.sweep_waves, keep_times=True))
                ttfts = [a.first_token for a in answers if a.first_token is not None]
                gaps = [gap for a in answers for gap in a.gaps()]
                results.add(f"sweep{streams}_ttft_p50_ms", target.path, 1000 * percentile(ttfts, 50))
                results.add(f"sweep{streams}_ttft_p99_ms", target.path, 1000 * percentile(ttfts, 99))
                results.add(f"sweep{streams}_gap_p99_ms", target.path, 1000 * percentile(gaps, 99))
                if target.pid:
                    results.add(f"sweep{streams}_cpu_pct", target.path, 100 * cpu / wall)
                results.add(f"sweep{streams}_errors", target.path, problems(answers, tokens))
                results.error(f"sweep {streams} streams, {target.path}", answers)
        results.note_rss("sweep", targets)


def part_per_request(sizes: Sizes, results: Results, machine: Machine, fallback: str, workdir: Path) -> None:
    tokens = sizes.max_tokens
    with simulator(machine, "--no-physics") as sim, three_paths(machine, sim.url, fallback, workdir) as targets:
        warm_up(targets)
        for _, target in interleaved(sizes.request_rounds, targets):
            answers, _, cpu = measured(target, run_streams(target, 1, tokens, waves=sizes.requests))
            ttfts = [a.first_token for a in answers if a.first_token is not None]
            results.add("request_ttft_p50_ms", target.path, 1000 * percentile(ttfts, 50))
            results.add("request_ttft_p99_ms", target.path, 1000 * percentile(ttfts, 99))
            results.add("request_total_p50_ms", target.path, 1000 * percentile([a.duration for a in answers], 50))
            if target.pid:
                results.add("request_cpu_ms", target.path, 1000 * cpu / len(answers))
            results.add("request_errors", target.path, problems(answers, tokens))
            results.error(f"per-request, {target.path}", answers)
        results.note_rss("per-request", targets)
    direct = results.figures["request_ttft_p50_ms"]["direct"]
    for path in PROXIES:
        for round_, ttft in enumerate(results.figures["request_ttft_p50_ms"][path]):
            results.add("request_added_ttft_ms", path, ttft - direct[round_])


def part_protocols(sizes: Sizes, results: Results, machine: Machine, fallback: str, workdir: Path) -> None:
    """Per API: the TTFT each proxy adds (sequential short requests) and its CPU per 1,000 chunks (one paced
    stream), measured in the same rounds."""
    tokens = sizes.protocol_tokens
    paced = ("--no-physics", "--token-time", str(sizes.chunk_token_time), "--max-output-tokens", str(tokens))
    with simulator(machine, *paced) as sim, three_paths(machine, sim.url, fallback, workdir) as targets:
        for api, wire in WIRES.items():
            for target in targets:
                asyncio.run(run_streams(target, 1, 4, wire=wire))  # warm-up
            for _, target in interleaved(sizes.rounds, targets):
                short, _, _ = measured(target, run_streams(target, 1, sizes.max_tokens, waves=sizes.protocol_requests,
                                                           wire=wire))
                ttfts = [a.first_token for a in short if a.first_token is not None]
                results.add(f"{api}_ttft_p50_ms", target.path, 1000 * percentile(ttfts, 50) if ttfts else math.nan)
                answers, _, cpu = measured(target, run_streams(target, 1, tokens, wire=wire))
                if target.pid:
                    results.add(f"{api}_cpu_ms_per_1k", target.path, 1e6 * cpu / max(1, answers[0].tokens))
                results.add(f"{api}_errors", target.path, sum(1 for a in [*short, *answers] if a.error))
                results.error(f"protocols {api}, {target.path}", [*short, *answers])
            direct = results.figures[f"{api}_ttft_p50_ms"]["direct"]
            for path in PROXIES:
                for round_, ttft in enumerate(results.figures[f"{api}_ttft_p50_ms"][path]):
                    results.add(f"{api}_added_ttft_ms", path, ttft - direct[round_])


async def first_answer(proxy: MitmProcess, deadline: float) -> float:
    """perf_counter() when the proxy first answers a streamed request completely; polls every 5 ms."""
    connection = RawConnection("127.0.0.1", proxy.port)
    request = stream_request(f"127.0.0.1:{proxy.port}", 4)
    try:
        while True:
            answer = await connection.stream(request, timeout=5.0)
            if answer.error is None:
                return time.perf_counter()
            if proxy.process.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {proxy.process.returncode}:\n{proxy.output()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no proxied answer in time; last: {answer.error}\n{proxy.output()}")
            await asyncio.sleep(0.005)
    finally:
        await connection.close()


def part_startup(sizes: Sizes, results: Results, machine: Machine, fallback: str, workdir: Path) -> None:
    # llm-ha's modules compiled to bytecode first, as mitmproxy's are and as `pip install` leaves an
    # installed llm-ha: a machine with PYTHONDONTWRITEBYTECODE would otherwise compile them at every start.
    compileall.compile_dir(REPO / "addons" / "llmha", quiet=1)
    with simulator(machine, "--no-physics") as sim:
        for round_ in range(-1, sizes.startup_rounds):  # round -1: the CA is made and files are cached
            for path in PROXIES:
                start = time.perf_counter()
                proxy = launch_proxy(path, sim.url, fallback, workdir, wait=False)
                try:
                    answered = asyncio.run(first_answer(proxy, start + 60))
                finally:
                    stop_proxy(machine, proxy)
                if round_ >= 0:
                    results.add("startup_ms", path, 1000 * (answered - start))


PART_RUNNERS = {"per-chunk": part_per_chunk, "sweep": part_sweep, "per-request": part_per_request,
                "startup": part_startup, "protocols": part_protocols}


# -- report

@dataclass(frozen=True)
class Line:
    key: str
    label: str


def lines_of(sizes: Sizes) -> dict[str, list[Line]]:
    n, rate = sizes.chunk_streams, sizes.sweep_rate
    chunk = [
        Line("paced_cpu_ms_per_1k", f"1 paced stream ({sizes.chunk_token_time * 1000:g} ms/token): "
                                    "proxy CPU ms / 1,000 chunks"),
        Line("paced_tokens_per_s", "1 paced stream: tokens/s delivered"),
        Line("fast_cpu_ms_per_1k", f"{n} fast streams: proxy CPU ms / 1,000 chunks"),
        Line("fast_tokens_per_s", f"{n} fast streams: tokens/s delivered"),
        Line("fast_cpu_pct", f"{n} fast streams: proxy CPU % (of one core)"),
        Line("paced_errors", "errors, paced"),
        Line("fast_errors", "errors, fast"),
    ]
    sweep = []
    for streams in sizes.sweep_streams:
        sweep += [
            Line(f"sweep{streams}_ttft_p50_ms", f"{streams} streams: TTFT p50 ms"),
            Line(f"sweep{streams}_ttft_p99_ms", f"{streams} streams: TTFT p99 ms"),
            Line(f"sweep{streams}_gap_p99_ms", f"{streams} streams: inter-token gap p99 ms "
                                               f"(nominal {1000 / rate:g})"),
            Line(f"sweep{streams}_cpu_pct", f"{streams} streams: proxy CPU %"),
            Line(f"sweep{streams}_errors", f"{streams} streams: errors"),
        ]
    request = [
        Line("request_ttft_p50_ms", "TTFT p50 ms"),
        Line("request_ttft_p99_ms", "TTFT p99 ms"),
        Line("request_added_ttft_ms", "added TTFT p50 ms (minus the direct path's, same round)"),
        Line("request_total_p50_ms", "whole answer p50 ms"),
        Line("request_cpu_ms", "proxy CPU ms / request"),
        Line("request_errors", "errors"),
    ]
    startup = [Line("startup_ms", "launch to first proxied answer, ms")]
    protocols = [line for api in WIRES for line in (
        Line(f"{api}_added_ttft_ms", f"{api}: added TTFT p50 ms (minus the direct path's, same round)"),
        Line(f"{api}_cpu_ms_per_1k", f"{api}: proxy CPU ms / 1,000 chunks, 1 paced stream"),
        Line(f"{api}_errors", f"{api}: errors"))]
    return {
        "per-chunk": chunk,
        "sweep": sweep,
        "per-request": request,
        "startup": startup,
        "protocols": protocols,
    }


def titles(sizes: Sizes) -> dict[str, str]:
    return {
        "per-chunk": f"Per streamed chunk: streams of {sizes.chunk_tokens} tokens",
        "sweep": f"Concurrency sweep: each stream one answer of {sizes.sweep_tokens} tokens at "
                 f"{sizes.sweep_rate:g} tokens/s, streams started over {sizes.sweep_ramp:g} s"
                 + (f", {sizes.sweep_waves} answers each (closed loop)" if sizes.sweep_waves > 1 else ""),
        "per-request": f"Per request: {sizes.requests} streamed requests of {sizes.max_tokens} tokens, "
                       f"one after the other on a keep-alive connection, {sizes.request_rounds} rounds",
        "startup": "Start-up",
        "protocols": f"Per API: {sizes.protocol_requests} sequential requests of {sizes.max_tokens} tokens (added TTFT), "
                     f"one stream of {sizes.protocol_tokens} tokens at {sizes.chunk_token_time * 1000:g} ms/token (CPU)",
    }


def number(value: float) -> str:
    if math.isnan(value):
        return "-"
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return number(values[0])
    return f"{number(statistics.median(values))} [{number(min(values))}-{number(max(values))}]"


def ratios(figure: dict[str, list[float]], numerator: str = "llm-ha", denominator: str = "mitmdump") -> list[float]:
    """Per-round ratios numerator / denominator (rounds where the denominator is 0 are left out)."""
    return [a / b for a, b in zip(figure.get(numerator, []), figure.get(denominator, [])) if b]


def ratio_text(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def part_table(title: str, lines: list[Line], figures: Figures) -> Table | None:
    present = [line for line in lines if line.key in figures]
    if not present:
        return None
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    for column in ("direct", "mitmdump (bare)", "mitmdump + llm-ha", "llm-ha / mitmdump"):
        table.add_column(column, justify="right")
    for line in present:
        figure = figures[line.key]
        is_count = line.key.endswith("_errors")
        cells = [str(int(sum(figure[p]))) if is_count and p in figure else spread(figure.get(p, []))
                 for p in PATHS]
        table.add_row(line.label, *cells, "" if is_count else ratio_text(ratios(figure)))
    return table


@dataclass
class Goal:
    text: str
    value: str
    met: bool | None  # None: no target, a figure to report


def median_ratio(figures: Figures, key: str, numerator: str = "llm-ha", denominator: str = "mitmdump") -> float | None:
    values = ratios(figures.get(key, {}), numerator, denominator)
    return statistics.median(values) if values else None


def ratio_goal(figures: Figures, key: str, limit: float, text: str) -> Goal | None:
    value = median_ratio(figures, key)
    if value is None:
        return None
    return Goal(f"{text} <= {limit:g}x mitmdump's", f"{value:.2f}x", value <= limit)


def first_level_over(figures: Figures, levels: tuple[int, ...], path: str, factor: float = 2.0) -> str:
    """The first stream count at which `path`'s median TTFT p99 exceeds `factor` x the direct path's."""
    for streams in levels:
        figure = figures.get(f"sweep{streams}_ttft_p99_ms", {})
        if (path in figure and "direct" in figure
                and statistics.median(figure[path]) > factor * statistics.median(figure["direct"])):
            return str(streams)
    return f"none up to {levels[-1]}" if levels else "-"


def goals(figures: Figures, sizes: Sizes) -> list[Goal]:
    found: list[Goal | None] = [
        ratio_goal(figures, "paced_cpu_ms_per_1k", 1.2, "proxy CPU / 1,000 chunks, one paced stream"),
        ratio_goal(figures, "fast_cpu_ms_per_1k", 1.2, f"proxy CPU / 1,000 chunks, {sizes.chunk_streams} fast streams"),
    ]
    top = max(sizes.sweep_streams) if sizes.sweep_streams else None
    if top is not None and f"sweep{top}_ttft_p99_ms" in figures:
        found += [
            ratio_goal(figures, f"sweep{top}_ttft_p99_ms", 1.5, f"TTFT p99 at {top} streams"),
            ratio_goal(figures, f"sweep{top}_gap_p99_ms", 1.2, f"inter-token gap p99 at {top} streams"),
        ]
        errors = int(sum(figures[f"sweep{top}_errors"].get("llm-ha", [])))
        found.append(Goal(f"errors at {top} streams = 0", str(errors), errors == 0))
        found.append(Goal("stream count where TTFT p99 first exceeds 2x direct's",
                          f"llm-ha {first_level_over(figures, sizes.sweep_streams, 'llm-ha')}, "
                          f"mitmdump {first_level_over(figures, sizes.sweep_streams, 'mitmdump')}", None))
    found += [
        ratio_goal(figures, "request_added_ttft_ms", 1.5, "added TTFT per request"),
        ratio_goal(figures, "request_cpu_ms", 1.5, "proxy CPU per short request"),
        ratio_goal(figures, "startup_ms", 1.15, "start-up to first proxied answer"),
    ]
    return [goal for goal in found if goal is not None]


def goals_table(found: list[Goal]) -> Table:
    table = Table(title="Targets (issue 18): llm-ha vs bare mitmdump, medians of per-round ratios",
                  title_justify="left")
    for column in ("target", "measured", "met"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for goal in found:
        table.add_row(goal.text, goal.value, "-" if goal.met is None else "yes" if goal.met else "NO")
    return table


def rss_table(peaks: dict[str, dict[str, int]]) -> Table:
    table = Table(title="Peak RSS (VmHWM) of each proxy, MiB", title_justify="left")
    for column in ("part", "mitmdump (bare)", "mitmdump + llm-ha", "llm-ha / mitmdump"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, peak in peaks.items():
        bare, llm = peak.get("mitmdump", 0), peak.get("llm-ha", 0)
        table.add_row(part, f"{bare / 1024:.0f}", f"{llm / 1024:.0f}", f"{llm / bare:.2f}x" if bare else "-")
    return table


def noise(figures: Figures, machine: dict) -> str:
    """The rounds' spread, (max - min) / median, over every measured figure and path, and the machine's load."""
    spreads = []
    for key, figure in figures.items():
        if key.endswith("_errors") or key == "request_added_ttft_ms":
            continue
        for path, values in figure.items():
            middle = statistics.median(values)
            if len(values) > 1 and middle > 0:
                spreads.append(((max(values) - min(values)) / middle, f"{key}, {path}"))
    text = (f"Noise: other processes used {machine['other_cpu_pct']:g} % of the machine's "
            f"{machine['cpus']} CPUs during the run; load average {machine['load_before'][0]:.2f} before, "
            f"{machine['load_after'][0]:.2f} after.")
    if spreads:
        worst = max(spreads)
        text += (f" Rounds of one figure differ by {100 * statistics.median(s for s, _ in spreads):.0f} % "
                 f"(median of (max-min)/median), at worst {100 * worst[0]:.0f} % ({worst[1]}).")
    return text


def report(console: Console, results: Results, sizes: Sizes, machine: dict) -> list[Goal]:
    all_lines, all_titles = lines_of(sizes), titles(sizes)
    for part in PARTS:
        table = part_table(all_titles[part], all_lines[part], results.figures)
        if table is not None:
            console.print(table)
    found = goals(results.figures, sizes)
    console.print(goals_table(found))
    if results.peak_rss_kib:
        console.print(rss_table(results.peak_rss_kib))
    for where, messages in results.errors.items():
        console.print(f"[red]errors[/red] in {where} ({len(messages)} run(s)); first: {messages[0]}")
    console.print(noise(results.figures, machine))
    return found


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN (no samples) is not JSON


def write_json(out_dir: Path, results: Results, sizes: Sizes, machine: dict, found: list[Goal],
               parts: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-overhead-{stamp}.json"
    summary = {key: {p: {"median": _finite(statistics.median(v)), "min": _finite(min(v)), "max": _finite(max(v)),
                         "rounds": [_finite(x) for x in v]} for p, v in figure.items()}
               | {"ratio_llm_ha_to_mitmdump": ratios(figure)}
               for key, figure in results.figures.items()}
    path.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": parts, "sizes": asdict(sizes),
        "machine": machine, "figures": summary, "peak_rss_kib": results.peak_rss_kib,
        "errors": results.errors, "targets": [asdict(goal) for goal in found],
    }, indent=2))
    return path


# -- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmbench.bench_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of well under a minute")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder of the JSON results; default {OUT_DIR}")
    sizes = parser.add_argument_group("sizes (defaults: the full run; with --quick, tiny ones)")
    for f in fields(Sizes):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "sweep_streams":
            sizes.add_argument(flag, type=lambda s: tuple(int(n) for n in s.split(",")), default=None,
                               help=f"comma-separated stream counts; default {','.join(map(str, FULL.sweep_streams))}")
        else:
            sizes.add_argument(flag, type=type(getattr(FULL, f.name)), default=None,
                               help=f"default {getattr(FULL, f.name)}, quick {getattr(QUICK, f.name)}")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    base = QUICK if args.quick else FULL
    args.sizes = replace(base, **{f.name: getattr(args, f.name) for f in fields(Sizes)
                                  if getattr(args, f.name) is not None})
    if min(args.sizes.rounds, args.sizes.startup_rounds, args.sizes.request_rounds) < 1:
        parser.error("--rounds, --startup-rounds and --request-rounds must be at least 1")
    return args


def run(parts: list[str], sizes: Sizes, console: Console) -> tuple[Results, dict]:
    results, machine = Results(), Machine()
    with tempfile.TemporaryDirectory(prefix="llm-ha-bench-") as workdir, \
            simulator(machine, "--no-physics") as fallback:
        for part in parts:
            console.print(f"[dim]{time.strftime('%H:%M:%S')} {part}...[/dim]")
            PART_RUNNERS[part](sizes, results, machine, fallback.url, Path(workdir))
    return results, machine.report()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks: stop what we started
    parts = [part for part in PARTS if part in args.only.split(",")]
    raise_fd_limit()
    console = Console(width=170)
    results, machine = run(parts, args.sizes, console)
    found = report(console, results, args.sizes, machine)
    path = write_json(args.out, results, args.sizes, machine, found, parts)
    console.print(f"Results: {path}")


if __name__ == "__main__":
    main()
