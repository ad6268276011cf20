"""The live panel: rendering, the standalone viewer, and LivePanel in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import codecs
import io
import json
import logging
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.style import Style

from llmha.panel import (
    LivePanel,
    Viewer,
    build_panel,
    build_unreachable_panel,
    downsample,
    format_event,
    sparkline,
    status_url,
)
from llmha.proxy.httpserver import HttpServer
from support.terminal import CHILD_ENV, Tmux

NOW = 1764040000.0
STATUS = {
    "now": NOW,
    "profile": {
        "name": "local-two-upstreams",
        "path": "profiles/local-two-upstreams.yaml",
        "failure_rate_threshold": 50.0,
        "interval_s": 1.0,
        "base_ejection_time_s": 30.0,
        "max_ejection_time_s": 300.0,
        "first_byte_timeout_ms": 200.0,
        "min_requests": 1,
    },
    "upstreams": [
        {
            "name": "primary",
            "first_byte_timeout_ms": 200.0,
            "nodes": [
                {
                    "url": "http://127.0.0.1:8001", "state": "ejected", "k": 2, "ejections": 3,
                    "ejected_remaining_s": 41.3, "failure_rate": 75.0, "requests": 1234, "inflight": 3,
                    "ttfb_p50_ms": 180.0, "ttfb_p95_ms": 420.0, "requests_per_s": 12.0,
                    "ttfb_history_ms": [None, 0.0, 25.0, 100.0, 150.0, 200.0, 400.0], "limit": 8, "shed": 4,
                },
                {
                    "url": "http://127.0.0.1:8002", "state": "healthy", "k": 1, "ejections": 0,
                    "ejected_remaining_s": 0.0, "failure_rate": 50.0, "requests": 800, "inflight": 1,
                    "ttfb_p50_ms": 60.0, "ttfb_p95_ms": 110.0, "requests_per_s": 4.5,
                    "ttfb_history_ms": [60.0] * 60, "limit": None, "shed": 0,
                },
            ],
        },
        {
            "name": "fallback",
            "first_byte_timeout_ms": 5000.0,
            "nodes": [
                {
                    "url": "http://127.0.0.1:9001", "state": "healthy", "k": 1, "ejections": 0,
                    "ejected_remaining_s": 0.0, "failure_rate": 0.0, "requests": 321, "inflight": 5,
                    "ttfb_p50_ms": 350.0, "ttfb_p95_ms": 900.0, "requests_per_s": 14.0,
                    "ttfb_history_ms": [350.0, 400.0, 900.0, None, 300.0], "limit": None, "shed": 0,
                }
            ],
        },
    ],
    "events": [
        {"ts": NOW - 9 + i, "action": "uneject", "upstream": "primary", "node": "http://127.0.0.1:8001", "k": 1}
        for i in range(6)
    ]
    + [
        {"ts": NOW - 1, "action": "eject", "upstream": "primary", "node": "http://127.0.0.1:8001",
         "k": 2, "duration_s": 60.0, "failure_rate": 75.0},
    ],
}
MINIMAL_STATUS = {  # exactly the fields INTERFACE.md promises, nothing else
    "upstreams": [{"name": "primary", "nodes": [
        {"url": "http://127.0.0.1:8001", "state": "healthy", "k": 1, "ejections": 0, "ejected_remaining_s": 0.0,
         "failure_rate": 0.0, "requests": 0, "inflight": 0, "ttfb_p50_ms": None, "ttfb_p95_ms": None}]}]
}
PYTHON = sys.executable
MITMDUMP = Path(sys.executable).with_name("mitmdump")
# pytest imports readline, which puts COLUMNS=80/LINES=24 into the C environment that children
# inherit (os.environ does not show them); rich in a child would obey them over the real terminal.


def render_text(renderable, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def styles_of(renderable, fragment: str, width: int = 160) -> list[Style]:
    """The style of every rendered segment whose text contains `fragment`."""
    console = Console(width=width, file=io.StringIO())
    return [seg.style for seg in console.render(renderable) if fragment in seg.text and seg.style]


def has_style(renderable, fragment: str, color: str, bold: bool | None = None) -> bool:
    return any(
        style.color is not None and style.color.name == color and (bold is None or bool(style.bold) == bold)
        for style in styles_of(renderable, fragment)
    )


def row_of(text: str, needle: str) -> list[str]:
    """The whitespace-separated cells of the table row containing `needle` (borders stripped)."""
    line = next(line for line in text.splitlines() if needle in line)
    return line.strip("│ ").split()


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def test_header_names_the_profile_and_its_limits():
    header = render_text(build_panel(STATUS)).splitlines()[1]
    parts = ("local-two-upstreams", "threshold 50%", "interval 1s", "base ejection 30s", "first-byte timeout 200ms")
    assert all(part in header for part in parts)


def test_rows_are_grouped_by_upstream_primary_first():
    lines = render_text(build_panel(STATUS)).splitlines()
    order = [next(i for i, line in enumerate(lines) if url in line) for url in (":8001", ":8002", ":9001")]
    assert order == sorted(order)
    assert row_of("\n".join(lines), ":8001")[0] == "primary"
    assert row_of("\n".join(lines), ":8002")[0] == "http://127.0.0.1:8002"  # name only on the first row
    assert row_of("\n".join(lines), ":9001")[0] == "fallback"


def test_ejected_node_is_red_with_a_countdown_and_healthy_is_green():
    panel = build_panel(STATUS)
    text = render_text(panel)
    assert "ejected 41s" in text
    assert has_style(panel, "ejected 41s", "red", bold=True)
    assert has_style(panel, "healthy", "green")


def test_row_shows_k_ejections_rate_rps_inflight_limit_shed_and_ttfb():
    text = render_text(build_panel(STATUS))
    assert row_of(text, ":8001")[:13] == [
        "primary", "http://127.0.0.1:8001", "ejected", "41s", "2", "3",  # state, k, ejections
        "75%", "/", "50%", "12", "3/8", "4", "180/420",  # failure rate, req/s, in-flight/limit, shed, TTFB
    ]
    assert row_of(text, ":8002")[7:11] == ["4.5", "1", "0", "60/110"]  # no limit: in-flight alone


def test_failure_rate_is_red_at_or_above_the_threshold():
    panel = build_panel(STATUS)
    assert has_style(panel, "75% / 50%", "red", bold=True)
    assert has_style(panel, "50% / 50%", "red", bold=True)  # at the threshold ejects too
    assert has_style(panel, "0% / 50%", "green")


def test_sparkline_scales_to_the_first_byte_timeout():
    line = sparkline([None, 0.0, 25.0, 100.0, 150.0, 200.0, 400.0], ceiling=200.0)
    assert line.plain == " ▁▁▄▆██"
    styles = {line.plain[span.start]: span.style for span in line.spans}
    assert styles["▄"] == "yellow" and styles["█"] == "red" and styles["▁"] == "green"


def test_sparkline_without_ceiling_uses_the_window_maximum():
    assert sparkline([10.0, 20.0, 40.0], ceiling=None).plain == "▂▄█"
    assert sparkline([], ceiling=None).plain == ""


def test_downsample_keeps_the_whole_window_by_worst_value():
    assert downsample([1, 2, 3], 10) == [1, 2, 3]
    assert downsample(list(range(60)), 30) == list(range(1, 60, 2))
    assert downsample([None, None, 5, None], 2) == [None, 5]
    assert len(downsample(list(range(60)), 25)) <= 25


def test_sparklines_are_in_the_table_with_gaps_as_spaces():
    text = render_text(build_panel(STATUS))
    primary_row = next(line for line in text.splitlines() if ":8001" in line)
    assert primary_row.rstrip(" │").endswith(" ▁▁▄▆██")  # newest sample at the right edge
    assert row_of(text, ":9001")[-2:] == ["▁▁▂", "▁"]  # 900 of 5000 ms, a gap, 300 ms


def test_events_show_the_last_six_in_local_time():
    text = render_text(build_panel(STATUS))
    clock = time.strftime("%H:%M:%S", time.localtime(NOW - 1))
    assert f"{clock} eject primary http://127.0.0.1:8001 k=2 for 60s at 75%" in text
    assert text.count(" uneject primary") == 5  # 7 events, the oldest one dropped
    assert time.strftime("%H:%M:%S", time.localtime(NOW - 9)) not in text
    assert has_style(build_panel(STATUS), "eject", "red", bold=True)


def test_event_extra_fields_are_shown_as_key_value():
    event = {"ts": NOW, "action": "failover", "upstream": "fallback", "reason": "first_byte_timeout"}
    assert format_event(event).plain.endswith("failover fallback reason=first_byte_timeout")


def test_minimal_interface_status_renders():
    text = render_text(build_panel(MINIMAL_STATUS))
    assert "no profile loaded" in text
    assert row_of(text, ":8001")[:6] == ["primary", "http://127.0.0.1:8001", "healthy", "1", "0", "0%"]
    assert "–/–" in text and "no events yet" in text
    assert "no upstreams" in render_text(build_panel({}))


def test_narrow_terminal_drops_minor_columns_instead_of_squeezing():
    text = render_text(build_panel(STATUS), width=80)
    assert row_of(text, "ejected")[:6] == ["primary", "ejected", "41s", "2", "75%", "/"]
    assert "…" not in text


def test_unreachable_panel_names_the_error():
    panel = build_unreachable_panel("http://x/status", "ConnectError: refused", NOW, 3, retry_every=0.5)
    text = render_text(panel)
    assert "unreachable (retrying every 0.5s)" in text
    assert "last error: ConnectError: refused" in text and "3 failed attempts" in text


def test_status_url_accepts_host_port_and_full_urls():
    assert status_url("127.0.0.1:9000") == "http://127.0.0.1:9000/status"
    assert status_url("http://127.0.0.1:9000/") == "http://127.0.0.1:9000/status"
    assert status_url("http://127.0.0.1:9000/status") == "http://127.0.0.1:9000/status"


# ---------------------------------------------------------------------------------------------------
# The standalone viewer
# ---------------------------------------------------------------------------------------------------


class StatusServer:
    """`GET /status` answering `self.status` as JSON, on its own event-loop thread."""

    def __init__(self, status: dict | None = None) -> None:
        self.status = status if status is not None else STATUS
        self.http_status = 200
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: HttpServer | None = None
        self.port = 0

    async def _handle(self, request, responder) -> None:
        body = json.dumps(self.status).encode()
        await responder.respond(self.http_status, body, [("content-type", "application/json")])

    def start(self) -> StatusServer:
        self.server = HttpServer(self._handle, port=self.port)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        self.port = self.server.port
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)

    def close(self) -> None:
        if self.server is not None and self.server.listening:
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def status_server():
    server = StatusServer().start()
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_viewer(*args: str) -> subprocess.CompletedProcess:
    env = {**CHILD_ENV, "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run(
        [PYTHON, "-m", "llmha.panel", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_viewer_once_prints_one_frame(status_server):
    result = run_viewer(f"127.0.0.1:{status_server.port}", "--once")
    assert result.returncode == 0, result.stderr
    assert "local-two-upstreams" in result.stdout and "ejected 41s" in result.stdout
    assert f"{status_server.url}/status" in result.stdout


def test_viewer_once_against_a_closed_port_says_unreachable():
    result = run_viewer(f"http://127.0.0.1:{closed_port()}", "--once")
    assert result.returncode == 1
    assert "unreachable" in result.stdout and "ConnectError" in result.stdout


def test_viewer_reports_http_errors_and_recovers(status_server):
    viewer = Viewer(f"{status_server.url}/status", retry_every=0.5)
    status_server.http_status = 500
    reachable, frame = viewer.poll()
    assert not reachable and "HTTP 500" in render_text(frame)
    status_server.http_status = 200
    reachable, frame = viewer.poll()
    assert reachable and "ejected 41s" in render_text(frame) and viewer.failures == 0
    viewer.close()


def default_sigint() -> None:
    """Undo an inherited "ignore SIGINT" (a shell's background job), so Ctrl-C can be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PtyProcess:
    """A child process on a pseudo-terminal of a given size; its output is collected in `output`."""

    def __init__(self, argv: list[str], rows: int = 40, cols: int = 160) -> None:
        import fcntl
        import struct
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True, env=CHILD_ENV,
            preexec_fn=default_sigint,
        )
        os.close(slave)
        self.master = master
        self.output = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.output += self._decoder.decode(data)

    def wait_for(self, text: str, after: int = 0, timeout: float = 10.0) -> int:
        """Position of `text` in the output at or after `after`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            position = self.output.find(text, after)
            if position >= 0:
                return position
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen within {timeout}s; output tail: {self.output[-2000:]!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def test_watching_viewer_survives_the_server_restarting_and_exits_on_ctrl_c(status_server):
    viewer = PtyProcess([PYTHON, "-m", "llmha.panel", status_server.url, "--interval", "0.1"])
    try:
        seen = viewer.wait_for("local-two-upstreams")
        status_server.stop()
        seen = viewer.wait_for("unreachable (retrying every 0.1s)", after=seen)
        status_server.start()  # same port again
        viewer.wait_for("local-two-upstreams", after=seen)
        viewer.proc.send_signal(signal.SIGINT)
        assert viewer.proc.wait(5) == 0
        assert "Traceback" not in viewer.output
        assert viewer.output.rstrip().endswith("\x1b[?25h")  # cursor shown again
    finally:
        viewer.close()


# ---------------------------------------------------------------------------------------------------
# LivePanel
# ---------------------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_panel_is_off_when_stdout_is_not_a_terminal():
    calls = []
    panel = LivePanel(lambda: calls.append(1) or STATUS, stream=io.StringIO())
    assert panel.start() is False
    assert not panel.running and calls == []
    panel.stop()  # harmless


def test_live_panel_routes_held_streams_through_the_panel_and_restores_them(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    handler = logging.StreamHandler(terminal)  # like mitmproxy's TermLogHandler: holds its own reference
    logger = logging.getLogger("llmha.test_panel")
    logging.getLogger().addHandler(handler)
    logger.setLevel(logging.INFO)
    calls = []
    panel = LivePanel(lambda: calls.append(time.monotonic()) or STATUS, refresh_per_second=20)
    try:
        assert panel.start() is True
        assert handler.stream is not terminal and sys.stdout is not terminal
        logger.info("a log line")
        print("a printed line")
        sys.stdout.write("an unfinished line")
        time.sleep(0.5)
    finally:
        panel.stop()
        logging.getLogger().removeHandler(handler)
    assert handler.stream is terminal and sys.stdout is terminal
    output = terminal.getvalue()
    for line in ("a log line", "a printed line", "an unfinished line", "ejected 41s"):
        assert line in output
    assert output.index("a log line") < output.rindex("ejected 41s")
    ticks = calls[:-1]  # the last call draws the final frame in stop()
    assert len(ticks) >= 3
    assert min(b - a for a, b in zip(ticks, ticks[1:])) >= 0.05 * 0.95  # never more than 20 a second


def test_live_panel_survives_a_failing_status(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)

    def broken() -> dict:
        raise RuntimeError("state torn down")

    panel = LivePanel(broken, refresh_per_second=50)
    assert panel.start()
    time.sleep(0.1)
    panel.stop()
    assert "status unavailable: RuntimeError('state torn down')" in terminal.getvalue()


# --- in a real terminal: tmux ----------------------------------------------------------------------

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


PANEL_SCRIPT = """
import json, logging, sys, threading, time
from pathlib import Path
from llmha.panel import LivePanel

status = json.loads(Path("status.json").read_text())
handler = logging.StreamHandler(sys.stdout)        # held stream, like mitmproxy's TermLog
handler.setFormatter(logging.Formatter("log %(message)s"))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
calls = []
panel = LivePanel(lambda: calls.append(1) or status, refresh_per_second=4)
print("panel started:", panel.start())

def chatter(n):
    for i in range(15):
        logging.info("thread %d line %02d \\x1b[32mcoloured\\x1b[0m", n, i)
        print(f"print thread {n} line {i:02d}")
        time.sleep(0.01)

threads = [threading.Thread(target=chatter, args=(n,)) for n in range(3)]
started = time.monotonic()
[t.start() for t in threads]
[t.join() for t in threads]
print("chatter done")
while not Path("stop").exists() and time.monotonic() - started < 20:
    time.sleep(0.05)
seconds = time.monotonic() - started
panel.stop()
print(f"stopped; restored={sys.stdout is handler.stream}; calls={len(calls)} in {seconds:.1f}s")
"""

LOG_LINE = re.compile(r"^(log thread \d line \d\d coloured|print thread \d line \d\d)$")


def split_at_panel(screen: str) -> tuple[list[str], list[str]]:
    """The non-blank lines above the panel, and the panel's; there must be exactly one panel."""
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    tops = [i for i, line in enumerate(lines) if line.startswith("╭─ llm-ha")]
    assert len(tops) == 1, f"expected one panel, found {len(tops)}:\n{screen}"
    return lines[: tops[0]], lines[tops[0] :]


@needs_tmux
def test_live_panel_in_a_terminal_keeps_log_lines_above_the_panel(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    (tmp_path / "panel.py").write_text(PANEL_SCRIPT)
    tmux = Tmux(f"{PYTHON} panel.py", cwd=tmp_path)
    try:
        screen = tmux.wait_for(lambda s: "chatter done" in s and "ejected 41s" in s)
        above, panel = split_at_panel(screen)
        assert all(line[:1] in "│╰" for line in panel[1:]) and panel[-1].startswith("╰")  # at the bottom
        assert "ejected 41s" in "\n".join(panel)
        log_lines = [line for line in above if LOG_LINE.match(line)]
        assert len(log_lines) == len(set(log_lines)) == 90  # every line once and whole
        assert all(LOG_LINE.match(line) or line in ("panel started: True", "chatter done") for line in above)

        (tmp_path / "stop").touch()
        screen = tmux.wait_for(lambda s: "EXIT 0" in s)
        after = screen[screen.index("chatter done"):]
        assert re.search(r"stopped; restored=True; calls=(\d+) in ([\d.]+)s", after)
        calls, seconds = map(float, re.search(r"calls=(\d+) in ([\d.]+)s", after).groups())
        assert calls <= 4 * seconds + 2  # the first frame, 4 a second, the last frame
        split_at_panel(screen[: screen.index("stopped;")])  # the last frame stays, once
    finally:
        tmux.kill()


MITMDUMP_ADDON = """
import json, logging
from pathlib import Path
from llmha.panel import LivePanel

STATUS = json.loads(Path("status.json").read_text())

class PanelOnly:
    def __init__(self):
        self.panel = LivePanel(lambda: STATUS)

    def running(self):
        if not self.panel.start():
            logging.info("llm-ha panel: off, stdout is not a terminal")

    def done(self):
        self.panel.stop()

addons = [PanelOnly()]
"""


@pytest.mark.e2e
@needs_tmux
@pytest.mark.skipif(not MITMDUMP.exists(), reason="mitmdump is not installed next to this Python")
def test_live_panel_in_mitmdump_keeps_termlog_and_dumper_lines_above(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    (tmp_path / "addon.py").write_text(MITMDUMP_ADDON)
    port, dead = closed_port(), closed_port()
    command = (f"{MITMDUMP} -p {port} --mode reverse:http://127.0.0.1:{dead} "
               f"--set connection_strategy=lazy -s addon.py")
    tmux = Tmux(command, cwd=tmp_path)
    try:
        tmux.wait_for(lambda s: "listening at" in s and "ejected 41s" in s)
        with httpx.Client(trust_env=False) as client:
            for n in range(3):
                assert client.get(f"http://127.0.0.1:{port}/v1/chat/{n}").status_code == 502
        screen = tmux.wait_for(lambda s: s.count("client disconnect") == 3 and "/v1/chat/2" in s)
        above, panel = split_at_panel(screen)
        assert panel[-1].startswith("╰") and "ejected 41s" in "\n".join(panel)
        assert any(re.fullmatch(r"\[[\d:.]+\] reverse proxy to http://127.0.0.1:\d+ listening at \*:\d+\.", x)
                   for x in above)  # TermLog
        for n in range(3):  # Dumper
            assert any(re.fullmatch(rf"127\.0\.0\.1:\d+: GET http://127\.0\.0\.1:{dead}/v1/chat/{n}", x)
                       for x in above)
        assert sum(line.startswith(" << ") for line in above) == 3

        tmux.send_keys("C-c")
        screen = tmux.wait_for(lambda s: "EXIT" in s)
        split_at_panel(screen)  # one panel: no stale top line left by the echoed ^C
        assert "Traceback" not in screen
    finally:
        tmux.kill()
