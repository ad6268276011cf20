"""mitmproxy console with llm-ha, driven through tmux: the debugging workflow a user follows."""

import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmbench.proxy import ADDON
from llmsim.control import free_port
from support.terminal import Tmux

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")]

MITMPROXY = Path(sys.executable).with_name("mitmproxy")


def test_failed_over_flow_filter_content_view_and_status_command(simulators, tmp_path, confdir):
    primary = simulators("--no-physics", "--first-token-delay", "1.0")
    fallback = simulators("--preset", "fallback")
    profile = tmp_path / "console.yaml"
    profile.write_text(f"""
first_byte_timeout: 200ms
upstreams:
  - name: primary
  - name: fallback
    nodes: ["{fallback.url}"]
    first_byte_timeout: 5s
""")
    port, status_port = free_port(), free_port()
    tmux = Tmux(f"{MITMPROXY} -p {port} --set listen_host=127.0.0.1 --set confdir={confdir} "
                f"--mode reverse:{primary.url} -s {ADDON} --set llm_ha_profile={profile} "
                f"--set llm_ha_status=127.0.0.1:{status_port}", cols=160, rows=45)
    try:
        tmux.wait_for(lambda s: "Flows" in s and "[scripts:1]" in s)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        llm = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert llm.headers["x-llm-ha-upstream"] == "fallback"
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)  # not an LLM flow
        screen = tmux.wait_for(lambda s: "/v1/chat/completions" in s and "/health" in s)
        assert marked(flow_line(screen, "/v1/chat/completions")), "the failed-over flow is marked in the list"
        assert not marked(flow_line(screen, "/health"))

        tmux.send_keys("f")
        time.sleep(0.3)
        tmux.send_keys("~marked", "Enter")
        screen = tmux.wait_for(lambda s: "/health" not in s and "/v1/chat/completions" in s, timeout=5)
        assert f"127.0.0.1:{port}" not in flow_line(screen, "/v1/chat/completions"), "the real request is shown"

        tmux.send_keys("Enter")  # the flow's detail
        time.sleep(0.5)
        tmux.send_keys("Tab")  # the response
        screen = tmux.wait_for(lambda s: "LLM stream" in s and "qwen-plus" in s and "attempts:" in s, timeout=5)
        lines = screen.splitlines()
        rows = lines[[line.strip() for line in lines].index("attempts:") + 1:][:3]
        assert rows[0].split()[:4] == ["#", "upstream", "node", "outcome"], screen
        assert rows[1].split()[:4] == ["1", "primary", primary.url, "timeout"], screen
        assert rows[2].split()[:5] == ["2", "fallback", fallback.url, "ok", "200"], screen
        assert "ms for the client; fallback" in screen and "(attempt 2 of 2)" in screen
        tmux.send_keys("Tab")  # the detail tab: the server is the node that answered, not the hand-off
        tmux.wait_for(lambda s: "Server Connection" in s and f"127.0.0.1:{fallback.port}" in s, timeout=5)
        tmux.send_keys("q")

        tmux.send_keys(":")
        time.sleep(0.3)
        tmux.send_keys("llmha.status", "Enter")  # the table is the command's result, shown in a pop-up
        screen = tmux.wait_for(lambda s: "inflight   p50ms" in s, timeout=5)
        primary_row = next(line for line in screen.splitlines() if primary.url in line and "primary " in line)
        assert primary_row.strip(" │").split()[2:4] == ["ejected", "1"], primary_row
        tmux.send_keys("q")
        time.sleep(0.3)
        tmux.send_keys("E")
        tmux.wait_for(lambda s: f"ejected primary {primary.url} for 30s (k=1" in s, timeout=5)

        # A client of the status endpoint keeps its connection open (as the panel viewer does) while
        # the console quits: the quit must stay clean.
        with httpx.Client() as viewer:
            assert viewer.get(f"http://127.0.0.1:{status_port}/status", timeout=5).status_code == 200
            tmux.send_keys("q")
            time.sleep(0.3)
            tmux.send_keys("q")
            tmux.wait_for(lambda s: "Quit" in s, timeout=5)
            tmux.send_keys("y")
            screen = tmux.wait_for(lambda s: "EXIT " in s, timeout=15)
        assert "EXIT 0" in screen and "Traceback" not in screen and "CancelledError" not in screen, screen
    finally:
        tmux.kill()


def flow_line(screen: str, path: str) -> str:
    return next(line for line in screen.splitlines() if path in line)


def marked(line: str) -> bool:
    return "\u25cf" in line or line.rstrip().endswith("#")  # mitmproxy's mark, or its ASCII form
