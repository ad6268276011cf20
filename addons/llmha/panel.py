"""The live panel: who is healthy, who is ejected and for how long, and how close TTFB is to the limit.

Three ways to show it, all rendering the dict served at `GET /status`:
- `build_panel(status)`: the pure renderable;
- `LivePanel`: pinned at the bottom of mitmdump's terminal while its log keeps scrolling above;
- `python -m llmha.panel http://127.0.0.1:PORT`: a standalone viewer polling `/status`.
"""

from __future__ import annotations

import argparse
import atexit
import io
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from rich import box
from rich.ansi import AnsiDecoder
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
EVENTS_SHOWN = 6
MISSING = "–"

STATE_STYLES = {"healthy": "green", "ejected": "bold red"}
ACTION_STYLES = {"eject": "bold red", "uneject": "green", "failover": "yellow", "k_decrease": "cyan",
                 "reset": "magenta"}
EVENT_FIELDS_SHOWN_SPECIALLY = {"ts", "action", "upstream", "node", "k", "duration_s", "failure_rate"}


# ---------------------------------------------------------------------------------------------------
# Rendering (pure)
# ---------------------------------------------------------------------------------------------------


def build_panel(status: dict, *, source: str = "") -> RenderableType:
    """The whole panel for one `/status` dict; optional fields may be missing."""
    profile = status.get("profile") or {}
    upstreams = status.get("upstreams") or []
    body = Group(
        _header(profile),
        _node_table(upstreams, profile),
        _events(status.get("events") or []),
    )
    subtitle = " · ".join(part for part in (*_instance(status), _clock(status.get("now")), source) if part)
    return _framed(body, subtitle, "blue")


def _instance(status: dict) -> list[str]:
    """Which instance this is and, with shared state, how it stands with the others."""
    parts = [f"instance {status['instance']}"] if status.get("instance") else []
    shared = status.get("shared_state")
    if shared:
        parts.append(f"shared state {shared.get('state')} ({len(shared.get('instances') or [])} live)")
    return parts


def build_unreachable_panel(
    url: str, error: str, down_since: float, attempts: int, retry_every: float | None = None
) -> RenderableType:
    headline = "unreachable" if retry_every is None else f"unreachable (retrying every {retry_every:g}s)"
    attempts_text = f"{attempts} failed attempt{'s' if attempts != 1 else ''}"
    lines = Group(
        Text(headline, style="bold red"),
        Text.assemble(("last error: ", "dim"), error),
        Text(f"down since {_clock(down_since)}, {attempts_text}", style="dim"),
    )
    return _framed(lines, url, "red")


def _framed(body: RenderableType, subtitle: str, border_style: str) -> Panel:
    return Panel(
        body,
        title="[bold]llm-ha[/bold]",
        title_align="left",
        subtitle=subtitle or None,
        subtitle_align="right",
        border_style=border_style,
    )


def sparkline(values: Sequence[float | None], ceiling: float | None) -> Text:
    """One block character per sample: █ means at or above `ceiling`; None (no sample) is a space.

    Without a ceiling the window's own maximum is used. Colours: green below half the ceiling,
    yellow below it, red at or above it.
    """
    samples = [v for v in values if v is not None]
    scale = ceiling or max(samples, default=0.0) or 1.0
    text = Text()
    for value in values:
        if value is None:
            text.append(" ")
            continue
        fraction = value / scale
        level = min(len(SPARK_LEVELS), max(1, math.ceil(fraction * len(SPARK_LEVELS))))
        text.append(SPARK_LEVELS[level - 1], style=_fraction_style(fraction))
    return text


def downsample(values: Sequence[float | None], width: int) -> list[float | None]:
    """At most `width` values, each the worst (largest) of an equal run of samples, newest run last."""
    if width <= 0:
        return []
    size = math.ceil(len(values) / width)
    if size <= 1:
        return list(values)
    start = len(values) % size  # the oldest, incomplete run is dropped
    runs = (values[i : i + size] for i in range(start, len(values), size))
    return [max((v for v in run if v is not None), default=None) for run in runs]


class Sparkline:
    """A sparkline that fits whatever width its table column gets, still covering the whole window."""

    def __init__(self, values: Sequence[float | None], ceiling: float | None) -> None:
        self.values = values
        self.ceiling = ceiling

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = len(self.values)
        return Measurement(min(width, 10), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield sparkline(downsample(self.values, options.max_width), self.ceiling)


def format_event(event: dict) -> Text:
    """`12:00:03 eject primary http://127.0.0.1:8001 k=2 for 60s at 75%` (local time)."""
    action = str(event.get("action", "?"))
    text = Text.assemble(
        (_clock(event.get("ts")) or "--:--:--", "dim"),
        " ",
        (action, ACTION_STYLES.get(action, "bold")),
    )
    for word in _event_words(event):
        text.append(" " + word)
    return text


def _event_words(event: dict) -> Iterable[str]:
    for key in ("upstream", "node"):
        if event.get(key):
            yield str(event[key])
    if event.get("k") is not None:
        yield f"k={event['k']}"
    if event.get("duration_s") is not None:
        yield f"for {_seconds(event['duration_s'])}"
    if event.get("failure_rate") is not None:
        yield f"at {_percent(event['failure_rate'])}"
    for key, value in event.items():
        if key not in EVENT_FIELDS_SHOWN_SPECIALLY and isinstance(value, str | int | float | bool):
            yield f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"


def _header(profile: dict) -> Text:
    if not profile:
        return Text("no profile loaded: every flow passes through untouched", style="yellow")
    parts = [
        ("threshold", _percent(profile.get("failure_rate_threshold"))),
        ("interval", _seconds(profile.get("interval_s"))),
        ("base ejection", _seconds(profile.get("base_ejection_time_s"))),
        ("max", _seconds(profile.get("max_ejection_time_s"))),
        ("first-byte timeout", _milliseconds(profile.get("first_byte_timeout_ms")) + " (█)"),
    ]
    text = Text.assemble(("profile ", "dim"), (str(profile.get("name", "?")), "bold"))
    for label, value in parts:
        text.append(f"  {label} ", style="dim")
        text.append(value)
    return text


NODE_COLUMNS = {
    "upstream": {"style": "bold", "no_wrap": True},
    "node": {"max_width": 34},  # node and sparkline are the columns that shrink on narrow terminals
    "state": {"no_wrap": True},
    "k": {"justify": "right", "no_wrap": True},
    "ej": {"justify": "right", "no_wrap": True},
    "fail / thr": {"justify": "right", "no_wrap": True},
    "req/s": {"justify": "right", "no_wrap": True},
    "inflight": {"justify": "right", "no_wrap": True},
    "shed": {"justify": "right", "no_wrap": True},
    "p50/p95 ms": {"justify": "right", "no_wrap": True},
    "TTFB 60s": {"justify": "right"},  # right edge = now, on every row
}
COLUMN_GAP = 3  # cell padding on both sides plus SIMPLE_HEAD's blank column separator
DROPPED_WHEN_NARROW = ("shed", "ej", "req/s", "inflight", "node")  # first dropped first


class NodeTable:
    """One row per node, grouped by upstream in order (primary first).

    When even the shrinkable columns cannot make it fit, the least important columns are left out
    rather than letting rich squeeze every column down to nothing.
    """

    def __init__(self, upstreams: list[dict], profile: dict) -> None:
        self.rows = [dict(zip(NODE_COLUMNS, cells)) for cells in _node_rows(upstreams, profile)]

    def table(self, hidden: Iterable[str] = ()) -> Table:
        columns = [name for name in NODE_COLUMNS if name not in hidden]
        table = Table(
            box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), pad_edge=False, header_style="bold dim"
        )
        for name in columns:
            table.add_column(name, **NODE_COLUMNS[name])
        for row in self.rows:
            table.add_row(*(row[name] for name in columns))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        hidden: list[str] = []
        for name in DROPPED_WHEN_NARROW:
            if self.needed_width(console, options, hidden) <= options.max_width:
                break
            hidden.append(name)
        yield self.table(hidden)

    def needed_width(self, console: Console, options: ConsoleOptions, hidden: Iterable[str]) -> int:
        """Width without squeezing: no-wrap columns whole, the others at their minimum.

        (rich's own table measurement lets no-wrap text shrink to its longest word.)
        """
        columns = [name for name in NODE_COLUMNS if name not in hidden]
        total = COLUMN_GAP * (len(columns) - 1)
        for name in columns:
            cells = (Text(name), *(row[name] for row in self.rows))
            sizes = [Measurement.get(console, options, cell) for cell in cells]
            whole = NODE_COLUMNS[name].get("no_wrap", False)
            total += max(size.maximum if whole else size.minimum for size in sizes)
        return total


def _node_table(upstreams: list[dict], profile: dict) -> RenderableType:
    if not upstreams:
        return Text("no upstreams configured", style="dim")
    return NodeTable(upstreams, profile)


def _node_rows(upstreams: list[dict], profile: dict) -> Iterable[list[RenderableType]]:
    threshold = profile.get("failure_rate_threshold")
    for upstream in upstreams:
        timeout = upstream.get("first_byte_timeout_ms") or profile.get("first_byte_timeout_ms")
        label = _upstream_label(upstream, profile)
        for index, node in enumerate(upstream.get("nodes") or []):
            yield [label if index == 0 else Text(""), *_node_cells(node, threshold, timeout)]
            for model, entry in (node.get("models") or {}).items():  # `health_scope: model`: a row per model
                yield [Text(""), *_model_cells(model, entry, threshold)]


def _upstream_label(upstream: dict, profile: dict) -> Text:
    label = Text(str(upstream.get("name", "?")))
    timeout = upstream.get("first_byte_timeout_ms")
    if timeout is not None and timeout != profile.get("first_byte_timeout_ms"):
        label.append(f" ≤{_milliseconds(timeout)}", style="dim")
    return label


def _node_cells(node: dict, threshold: float | None, timeout: float | None) -> list[RenderableType]:
    return [
        Shrinkable(Text(str(node.get("url", "?")), no_wrap=True, overflow="ellipsis"), minimum=12),
        _state_cell(node),
        _number(node.get("k")),
        _number(node.get("ejections")),
        _failure_cell(node.get("failure_rate"), threshold),
        _rate(node.get("requests_per_s")),
        _inflight_cell(node.get("inflight"), node.get("limit"), (node.get("cluster") or {}).get("inflight")),
        _shed_cell(node.get("shed")),
        _ttfb_cell(node.get("ttfb_p50_ms"), node.get("ttfb_p95_ms"), timeout),
        Sparkline(node.get("ttfb_history_ms") or [], timeout),
    ]


def _model_cells(model: str, entry: dict, threshold: float | None) -> list[RenderableType]:
    """A model's health entry on the node above: its own state, k, ejections and failure rate."""
    return [
        Shrinkable(Text(f"  #{model}", no_wrap=True, overflow="ellipsis", style="dim"), minimum=12),
        _state_cell(entry),
        _number(entry.get("k")),
        _number(entry.get("ejections")),
        _failure_cell(entry.get("failure_rate"), threshold),
        _rate(entry.get("requests_per_s")),
        Text(""), Text(""), Text(""), Text(""),
    ]


class Shrinkable:
    """A one-line text that accepts being cut (with an ellipsis) down to `minimum` cells."""

    def __init__(self, text: Text, minimum: int) -> None:
        self.text = text
        self.minimum = minimum

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(self.minimum, len(self.text)), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.text


def _state_cell(node: dict) -> Text:
    state = str(node.get("state", "?"))
    label = state
    if state == "ejected" and node.get("ejected_remaining_s") is not None:
        label = f"ejected {max(0, round(node['ejected_remaining_s']))}s"
    return Text(label, style=STATE_STYLES.get(state, "yellow"))


def _failure_cell(rate: float | None, threshold: float | None) -> Text:
    if rate is None:
        return Text(MISSING, style="dim")
    if threshold is not None and rate >= threshold:
        style = "bold red"
    else:
        style = "yellow" if rate > 0 else "green"
    label = _percent(rate) if threshold is None else f"{_percent(rate)} / {_percent(threshold)}"
    return Text(label, style=style)


def _inflight_cell(inflight: int | None, limit: int | None, cluster: int | None = None) -> Text:
    """`here/limit`; with shared state `here/cluster/limit` (the limit bounds the cluster's)."""
    if inflight is None:
        return Text(MISSING, style="dim")
    counts = [inflight] if cluster is None else [inflight, cluster]
    if limit is None:
        return Text("/".join(map(str, counts)))
    busy = max(counts) >= limit
    return Text("/".join(map(str, [*counts, limit])), style="yellow" if busy else "")


def _shed_cell(shed: int | None) -> Text:
    if not shed:
        return Text(str(shed) if shed is not None else MISSING, style="dim")
    return Text(str(shed), style="yellow")


def _ttfb_cell(p50: float | None, p95: float | None, timeout: float | None) -> Text:
    """`180/420`; p95 coloured by how close it is to the first-byte timeout."""
    text = Text(MISSING if p50 is None else f"{p50:.0f}", style="dim" if p50 is None else "")
    text.append("/")
    if p95 is None:
        text.append(MISSING, style="dim")
    else:
        text.append(f"{p95:.0f}", style=_fraction_style(p95 / timeout) if timeout else "")
    return text


def _events(events: list[dict]) -> RenderableType:
    if not events:
        return Text("no events yet", style="dim")
    lines = [Text("recent events", style="bold dim")]
    lines += [format_event(event) for event in events[-EVENTS_SHOWN:]]
    return Group(*lines)


def _fraction_style(fraction: float) -> str:
    if fraction >= 1.0:
        return "red"
    return "yellow" if fraction >= 0.5 else "green"


def _number(value: int | None) -> Text:
    return Text(MISSING, style="dim") if value is None else Text(str(value))


def _rate(value: float | None) -> Text:
    if value is None:
        return Text(MISSING, style="dim")
    return Text(f"{value:.1f}" if value < 10 else f"{value:.0f}")


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.0f}%"


def _seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:g}s"


def _milliseconds(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value / 1000:g}s" if value >= 1000 else f"{value:g}ms"


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts is not None else ""


# ---------------------------------------------------------------------------------------------------
# LivePanel: the panel inside mitmdump
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Swap:
    owner: Any
    attr: str
    original: IO[str]
    replacement: _ConsoleWriter


class _ConsoleWriter(io.TextIOBase):
    """A file that prints each complete line above the live panel (ANSI colours kept).

    Unfinished lines are kept per thread: `print()` writes the text and the newline in two calls,
    and another thread's line must not land in between.
    """

    def __init__(self, panel: LivePanel, original: IO[str]) -> None:
        self._panel = panel
        self._original = original
        self._partial: dict[int, str] = {}
        self._decoder = AnsiDecoder()

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._panel._lock:
            if not self._panel.running:  # a late write through a reference taken before stop()
                return self._original.write(self._partial.pop(thread, "") + text)
            *lines, rest = (self._partial.pop(thread, "") + text).split("\n")
            if rest:
                self._partial[thread] = rest
            if lines:
                self._panel._print_above(Text("\n").join(self._decoder.decode_line(line) for line in lines))
        return len(text)

    def flush_partial(self) -> None:
        with self._panel._lock:
            lines, self._partial = list(self._partial.values()), {}
            for line in lines:
                self.write(line + "\n")

    def flush(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # e.g. `.buffer`: such writes bypass the panel
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._original, name)

    def isatty(self) -> bool:
        return self._original.isatty()

    def fileno(self) -> int:
        return self._original.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._original, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


class LivePanel:
    """The panel pinned at the bottom of the terminal, redrawn `refresh_per_second` times a second.

    While it runs, everything that would be written to the terminal goes through the panel's console,
    which prints it above the panel. Rebinding `sys.stdout` alone is not enough: mitmdump's `TermLog`
    handler (`.file`) and `Dumper` addon (`.outfp`) keep the stdout object they were created with. So
    `start()` also swaps those references, found by identity on the root logger's handlers and on the
    running mitmproxy master's addons; `stop()` puts them back.

    One lock serialises every write to the terminal (log lines and redraws): rich's own auto-refresh
    thread computes the cursor movement and the redraw under different locks, which lets a log line
    printed from another thread land inside the panel.

    `get_status` runs on the panel's thread, at most `refresh_per_second` times per second (plus
    once in `start()` and once in `stop()`). `stream` is the terminal to draw on; default: sys.stdout.
    """

    def __init__(
        self,
        get_status: Callable[[], dict],
        refresh_per_second: float = 4,
        *,
        stream: IO[str] | None = None,
    ) -> None:
        self.get_status = get_status
        self.period = 1.0 / refresh_per_second
        self._stream = stream
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self._swaps: list[_Swap] = []

    @property
    def running(self) -> bool:
        return self._live is not None

    def start(self) -> bool:
        """Show the panel; False (and nothing shown) when stdout is not a terminal (or a dumb one)."""
        if self.running:
            return True
        stream = self._stream or sys.stdout
        console = Console(file=stream, _environ=_without_size_overrides(os.environ))
        if not _isatty(stream) or console.is_dumb_terminal:
            return False
        first_frame = self._render()
        with self._lock:
            self._live = Live(
                first_frame,
                console=console,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start(refresh=True)
            self._swaps = _swap_streams(self, _terminal_streams(stream))
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="llm-ha-panel", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return True

    def stop(self) -> None:
        """Draw the last frame, leave it on screen, and give the terminal back. Idempotent."""
        if not self.running:
            return
        atexit.unregister(self.stop)
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        last_frame = self._render()  # outside the lock: get_status may log
        with self._lock:
            for swap in self._swaps:
                swap.replacement.flush_partial()
            assert self._live is not None
            self._live.update(last_frame)
            self._live.stop()
            _restore_streams(self._swaps)
            self._swaps = []
            self._live = None

    def refresh(self) -> None:
        """Redraw now with a fresh status (the panel thread does this on its own)."""
        renderable = self._render()
        with self._lock:
            if self._live is not None:
                self._live.update(renderable, refresh=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(max(0.0, last + self.period - time.monotonic())):
            last = time.monotonic()
            self.refresh()

    def _render(self) -> RenderableType:
        try:
            panel = build_panel(self.get_status())
        except Exception as exc:  # the panel must never take the proxy down
            panel = _framed(Text(f"status unavailable: {exc!r}", style="red"), "", "red")
        return RightMargin(panel, TERMINAL_ECHO_ROOM)

    def _print_above(self, text: Text) -> None:
        assert self._live is not None
        self._live.console.print(text)


TERMINAL_ECHO_ROOM = 2


class RightMargin:
    """Renders narrower than the terminal by `width` columns.

    The cursor rests after the panel's last line. If that line filled the terminal, the "^C" the
    terminal echoes on Ctrl-C would wrap onto a new line, scroll the screen, and the final redraw
    would leave the panel's top line behind.
    """

    def __init__(self, renderable: RenderableType, width: int) -> None:
        self.renderable = renderable
        self.width = width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from console.render(self.renderable, options.update_width(max(1, options.max_width - self.width)))


def _without_size_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """rich prefers $COLUMNS/$LINES over the terminal's real size; a stale value (Python's readline
    exports 80x24 to child processes) would make the panel wrap, and a wrapped live panel leaves
    garbage behind on every redraw."""
    return {key: value for key, value in environ.items() if key not in ("COLUMNS", "LINES")}


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _terminal_streams(stream: IO[str]) -> list[IO[str]]:
    """`stream`, and stderr too when it is the same terminal."""
    if sys.stderr is not stream and _same_terminal(stream, sys.stderr):
        return [stream, sys.stderr]
    return [stream]


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    try:
        return os.ttyname(a.fileno()) == os.ttyname(b.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


STREAM_ATTRS = ("stream", "file", "outfp")  # logging.StreamHandler, mitmproxy TermLogHandler, Dumper


def _stream_holders() -> list[tuple[Any, str]]:
    holders: list[tuple[Any, str]] = [(sys, "stdout"), (sys, "stderr")]
    objects = [*logging.getLogger().handlers, *_mitmproxy_addons()]
    for obj in objects:
        holders += [(obj, attr) for attr in STREAM_ATTRS if hasattr(obj, attr)]
    return holders


def _mitmproxy_addons() -> list[Any]:
    try:
        from mitmproxy import ctx

        return list(ctx.master.addons.chain)
    except (ImportError, AttributeError):
        return []


def _swap_streams(panel: LivePanel, streams: list[IO[str]]) -> list[_Swap]:
    writers: dict[int, _ConsoleWriter] = {}
    swaps = []
    for owner, attr in _stream_holders():
        current = getattr(owner, attr, None)
        if not any(current is stream for stream in streams):
            continue
        writer = writers.setdefault(id(current), _ConsoleWriter(panel, current))
        try:
            setattr(owner, attr, writer)
        except AttributeError:  # a read-only property: leave it alone
            continue
        swaps.append(_Swap(owner, attr, current, writer))
    return swaps


def _restore_streams(swaps: list[_Swap]) -> None:
    for swap in swaps:
        if getattr(swap.owner, swap.attr, None) is swap.replacement:
            setattr(swap.owner, swap.attr, swap.original)


# ---------------------------------------------------------------------------------------------------
# Standalone viewer: python -m llmha.panel http://127.0.0.1:PORT
# ---------------------------------------------------------------------------------------------------


class StatusUnavailable(Exception):
    pass


def status_url(address: str) -> str:
    """Accepts `HOST:PORT`, `http://HOST:PORT` or the full `/status` URL."""
    if "://" not in address:
        address = "http://" + address
    address = address.rstrip("/")
    return address if address.endswith("/status") else address + "/status"


def fetch_status(client, url: str) -> dict:
    """`GET url` with an httpx client: the status dict, or StatusUnavailable saying why not."""
    import httpx

    try:
        response = client.get(url)
        response.raise_for_status()
        status = response.json()
    except httpx.HTTPStatusError as exc:
        raise StatusUnavailable(f"HTTP {exc.response.status_code} {exc.response.reason_phrase}") from exc
    except httpx.HTTPError as exc:
        raise StatusUnavailable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
    except ValueError as exc:
        raise StatusUnavailable(f"invalid JSON: {exc}") from exc
    if not isinstance(status, dict):
        raise StatusUnavailable("status is not a JSON object")
    return status


class Viewer:
    """Polls `/status` and turns each answer, or failure, into a frame.

    `retry_every` (seconds) is only shown to the user; None means a single poll.
    """

    def __init__(self, url: str, retry_every: float | None = None, timeout: float = 2.0) -> None:
        self.url = url
        self.retry_every = retry_every
        import httpx  # the standalone viewer's; the proxy never imports it
        self.client = httpx.Client(timeout=timeout, trust_env=False)  # never via $HTTP_PROXY
        self.down_since: float | None = None
        self.failures = 0

    def poll(self) -> tuple[bool, RenderableType]:
        try:
            status = fetch_status(self.client, self.url)
        except StatusUnavailable as exc:
            self.down_since = self.down_since or time.time()
            self.failures += 1
            frame = build_unreachable_panel(self.url, str(exc), self.down_since, self.failures, self.retry_every)
            return False, frame
        self.down_since, self.failures = None, 0
        return True, build_panel(status, source=self.url)

    def close(self) -> None:
        self.client.close()


def watch(viewer: Viewer, console: Console, interval: float) -> None:
    """Poll until interrupted; on a terminal redraw in place, otherwise print each frame."""
    if not console.is_terminal:
        while True:
            console.print(viewer.poll()[1])
            time.sleep(interval)
    with Live(viewer.poll()[1], console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(viewer.poll()[1], refresh=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmha.panel", description="Live view of llm-ha's GET /status."
    )
    parser.add_argument("address", help="the llm_ha_status address: HOST:PORT or http://HOST:PORT")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    parser.add_argument("--once", action="store_true", help="print one frame; exit 1 if unreachable")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    retry_every = None if args.once else args.interval
    viewer = Viewer(status_url(args.address), retry_every, timeout=max(2.0, args.interval))
    console = Console()
    try:
        if args.once:
            reachable, frame = viewer.poll()
            console.print(frame)
            return 0 if reachable else 1
        watch(viewer, console, args.interval)  # returns only through Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
