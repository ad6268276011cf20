"""The live panel in a real mitmdump with llm-ha, under tmux, while a primary fails."""

import shutil
import sys
from pathlib import Path

import httpx
import pytest

from llmbench.proxy import ADDON
from support.terminal import Tmux

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")]

MITMDUMP = Path(sys.executable).with_name("mitmdump")


def test_panel_shows_the_ejected_node_and_k_with_log_lines_above(simulators, tmp_path, confdir):
    from llmsim.control import free_port
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    profile = tmp_path / "panel.yaml"
    profile.write_text(f"""
first_byte_timeout: 500ms
health_check: {{interval: 0.2s, base_ejection_time: 60s}}
upstreams:
  - name: primary
    nodes: ["{primary.url}"]
  - name: fallback
    nodes: ["{fallback.url}"]
""")
    port = free_port()
    command = (f"{MITMDUMP} -p {port} --set listen_host=127.0.0.1 --set confdir={confdir} -s {ADDON} "
               f"--set llm_ha_profile={profile} --set llm_ha_panel=true")
    tmux = Tmux(command, cols=170, rows=40)
    try:
        tmux.wait_for(lambda screen: "healthy" in screen and "primary" in screen)
        primary.set_faults(status=500)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert response.headers["x-llm-ha-upstream"] == "fallback"

        def complete_row(screen: str) -> list[str] | None:
            """The cells after "ejected" in the primary's panel row, once a redraw has finished it."""
            for line in reversed(screen.splitlines()):
                if primary.url in line and "ejected " in line and "llm-ha:" not in line and "eject primary" not in line:
                    cells = line.split("ejected", 1)[1].split()
                    return cells if len(cells) >= 4 else None
            return None

        screen = tmux.wait_for(lambda s: f"ejected primary {primary.url}" in s and complete_row(s) is not None)
        cells = complete_row(screen)
        assert cells[0].endswith("s") and cells[1:3] == ["1", "1"], f"countdown, k=1, 1 ejection: {cells}"
        log_line = next(i for i, line in enumerate(screen.splitlines()) if f"ejected primary {primary.url}" in line)
        panel_top = next(i for i, line in enumerate(screen.splitlines()) if "llm-ha" in line and "╭" in line)
        assert log_line < panel_top, "log lines scroll above the panel"
        assert "POST" in screen and "/v1/chat/completions" in screen, "mitmdump's flow lines are readable"
    finally:
        tmux.kill()
