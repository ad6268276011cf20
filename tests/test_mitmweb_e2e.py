"""mitmweb with llm-ha, started for real: its flow list, content view and command API, as a browser sees them."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmbench.proxy import ADDON
from llmsim.control import free_port, poll_until, terminate
from support.terminal import CHILD_ENV

pytestmark = pytest.mark.e2e

MITMWEB = Path(sys.executable).with_name("mitmweb")
PASSWORD = "llm-ha-test-" + secrets.token_hex(8)


class WebUi:
    """mitmweb's HTTP API, called as its own frontend does: the password as a bearer token, and the
    `_mitmproxy_xsrf` cookie echoed in `X-XSRFToken` for anything but GET."""

    def __init__(self, port: int) -> None:
        xsrf = secrets.token_hex(8)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                   headers={"Authorization": f"Bearer {PASSWORD}", "X-XSRFToken": xsrf},
                                   cookies={"_mitmproxy_xsrf": xsrf})

    def get(self, path: str):
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def command(self, name: str, *arguments: str) -> httpx.Response:
        return self.client.post(f"/commands/{name}", json={"arguments": list(arguments)})

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def mitmweb(confdir, tmp_path):
    """`mitmweb(reverse, profile_path)`: mitmweb with llm-ha on free ports of 127.0.0.1, stopped after the test."""
    if not MITMWEB.exists():
        pytest.skip(f"mitmweb is not installed beside {sys.executable}")
    started = []

    def start(reverse: str, profile: Path) -> tuple[int, WebUi, Path]:
        port, web_port = free_port(), free_port()
        log = tmp_path / "mitmweb.log"
        command = [str(MITMWEB), "-p", str(port), "--mode", f"reverse:{reverse}", "-s", str(ADDON),
                   "--set", "listen_host=127.0.0.1", "--set", "web_host=127.0.0.1", "--set", f"web_port={web_port}",
                   "--set", "web_open_browser=false", "--set", f"web_password={PASSWORD}",
                   "--set", f"confdir={confdir}", "--set", f"llm_ha_profile={profile}"]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=CHILD_ENV)
        ui = WebUi(web_port)
        started.append((process, ui))
        poll_until(lambda: log.read_text(), lambda text: "llm-ha: added the comment column" in text
                   or process.poll() is not None, 30, 0.1, "mitmweb's start")
        assert process.poll() is None, log.read_text()
        return port, ui, log

    yield start
    for process, ui in started:
        ui.close()
        terminate(process, 10)


def test_who_answered_the_attempts_and_every_command_over_mitmwebs_api(simulators, mitmweb, tmp_path):
    primary = simulators("--no-physics", "--first-token-delay", "1.0")
    fallback = simulators("--preset", "fallback")
    profile = tmp_path / "web.yaml"
    profile.write_text(f"""
first_byte_timeout: 200ms
upstreams:
  - name: primary
  - name: fallback
    nodes: ["{fallback.url}"]
    first_byte_timeout: 5s
""")
    port, ui, log = mitmweb(primary.url, profile)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      timeout=10).headers["x-llm-ha-upstream"] == "fallback"
    httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)  # not an LLM flow

    # The flow list: the comment column is on, the failed-over flow marked, its comment says who answered.
    assert "comment" in ui.get("/options")["web_columns"]["value"]
    flows = poll_until(lambda: ui.get("/flows"), lambda fs: len(fs) == 2 and all(f.get("response") for f in fs),
                       10, 0.1, "mitmweb's flows")
    llm, other = sorted(flows, key=lambda f: f["request"]["path"] != "/v1/chat/completions")
    assert llm["marked"] and not other["marked"]
    assert llm["comment"].startswith("fallback ") and llm["comment"].endswith("ms ← primary timeout 200ms")
    assert llm["server_conn"]["address"] == ["127.0.0.1", fallback.port], "the node that answered, not the hand-off"

    # The LLM stream view, as mitmweb renders it: the attempts as a table.
    view = ui.get(f"/flows/{llm['id']}/response/content/llm-stream.json")["text"]
    lines = view.splitlines()
    table = lines[lines.index("attempts:") + 1:][:3]
    assert [row.split()[:5] for row in table] == [["#", "upstream", "node", "outcome", "status"],
                                                  ["1", "primary", primary.url, "timeout", "-"],
                                                  ["2", "fallback", fallback.url, "ok", "200"]]
    assert "ms for the client; fallback" in view

    # Every command, through the route mitmweb's command bar uses.
    commands = ui.get("/commands")
    assert {"llmha.status", "llmha.eject", "llmha.restore", "llmha.reset"} <= commands.keys()
    assert ui.command("llm_ha.status").status_code == 404, "mitmweb's route takes [a-z.]+ only: why llmha.*"

    def primary_row() -> list[str]:
        status = ui.command("llmha.status").json()["value"]
        return next(line for line in status.splitlines() if line.startswith("primary ")).split()

    row = poll_until(primary_row, lambda r: r[2] == "ejected", 5, 0.2, "the primary's ejection (at its interval's end)")
    assert row[1:4] == [primary.url, "ejected", "1"]
    assert row[6] == "100.0", "while ejected: the failure rate that ejected it"

    drained = ui.command("llmha.eject", "fallback", "10m").json()["value"]
    assert drained.splitlines() == [f"fallback {fallback.url}: drained by hand for 10m, k unchanged",
                                    f"  fallback {fallback.url}: ejected for 600s more, k=1"]
    restored = ui.command("llmha.restore", "fallback").json()["value"]
    assert restored.splitlines()[-1] == f"  fallback {fallback.url}: healthy, k=1"
    ejected = ui.command("llmha.eject", fallback.url).json()["value"]
    assert ejected.splitlines()[-1] == f"  fallback {fallback.url}: ejected for 30s more, k=1"
    reset = ui.command("llmha.reset").json()["value"]
    assert reset.startswith(f"primary {primary.url}, fallback {fallback.url}: reset by hand")
    assert ui.command("llmha.eject", "nope").json()["error"].startswith("llm-ha: no node 'nope'")

    said = log.read_text()
    assert f"ejected fallback {fallback.url} for 600s (k=1, by hand)" in said
    assert f"fallback {fallback.url} restored by hand" in said and f"primary {primary.url} reset by hand" in said
