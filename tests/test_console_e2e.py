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
    port = free_port()
    tmux = Tmux(f"{MITMPROXY} -p {port} --set listen_host=127.0.0.1 --set confdir={confdir} "
                f"--mode reverse:{primary.url} -s {ADDON} --set llm_ha_profile={profile}", cols=160, rows=45)
    try:
        tmux.wait_for(lambda s: "Flows" in s and "[scripts:1]" in s)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        llm = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert llm.headers["x-llm-ha-upstream"] == "fallback"
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)  # not an LLM flow
        tmux.wait_for(lambda s: "/v1/chat/completions" in s and "/health" in s)

        tmux.send_keys("f")
        time.sleep(0.3)
        tmux.send_keys('~comment " -> "', "Enter")
        screen = tmux.wait_for(lambda s: "/health" not in s and "/v1/chat/completions" in s, timeout=5)
        assert f"127.0.0.1:{port}" not in screen.split("Flows", 1)[1].split("\n", 3)[1], "the real request is shown"

        tmux.send_keys("Enter")  # the flow's detail
        time.sleep(0.5)
        tmux.send_keys("Tab")  # the response
        tmux.wait_for(lambda s: "LLM stream" in s and "qwen-plus" in s, timeout=5)
        tmux.send_keys("q")

        tmux.send_keys(":")
        time.sleep(0.3)
        tmux.send_keys("llm_ha.status", "Enter")
        time.sleep(0.5)
        tmux.send_keys("E")
        screen = tmux.wait_for(lambda s: "inflight   p50ms" in s, timeout=5)  # the table, in the event log
        rows = [line for line in screen.splitlines() if line.lstrip().startswith("primary ") and primary.url in line]
        assert rows, screen
        primary_row = rows[-1]
        assert primary_row.split()[2:4] == ["ejected", "1"], primary_row
        assert f"ejected primary {primary.url} for 30s (k=1" in screen
    finally:
        tmux.kill()
