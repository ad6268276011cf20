"""The status server's HTML dashboard (GET /), rendered by a real headless Chromium while a primary is ejected.

Chromium is Debian's `chromium` package (.ci/run installs it); without it the browser test skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

PAGE = Path(__file__).resolve().parent.parent / "addons" / "llmha" / "dashboard.html"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server", "--hide-scrollbars", "--window-size=1400,600"]


def profile(primary: str, fallback: str) -> str:
    return f"""
first_byte_timeout: 500ms
health_check:
  failure_rate_threshold: 50
  interval: 0.2s
  base_ejection_time: 60s
upstreams:
  - name: primary
    nodes: ["{primary}"]
    max_inflight: 4
  - name: fallback
    nodes: ["{fallback}"]
"""


def chat(proxy) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10)


class NodeRows(HTMLParser):
    """The dashboard's node rows: {(upstream, node): {"state": ..., field: cell text, ...}}; and event actions."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.events: list[str] = []
        self._row: dict[str, str] | None = None
        self._field: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-upstream" in a:
            self._row = self.rows.setdefault((a["data-upstream"], a["data-node"]), {"row_state": a["data-state"]})
        elif tag == "li" and "data-action" in a:
            self.events.append(a["data-action"])
        if self._row is not None and "data-field" in a and self._field is None:
            self._field, self._depth = a["data-field"], 0
            self._row[self._field] = ""
        if self._field is not None:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._field is not None:
            self._depth -= 1
            if self._depth == 0:
                self._field = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self._row[self._field] += data


def test_the_dashboard_is_one_self_contained_page_that_loads_only_status(simulators, proxies):
    text = PAGE.read_text()
    assert re.findall(r"https?://[^\s\"'`<]+", text) == ["http://www.w3.org/2000/svg"]  # a namespace name, not a load
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!data:)", text)
    primary = simulators("--no-physics")
    proxy = proxies(f"upstreams:\n  - name: primary\n    nodes: ['{primary.url}']\n", reverse=primary.url)
    response = httpx.get(f"{proxy.status_url}/", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text == text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_chromium_shows_the_ejected_primary_with_its_k_and_countdown(simulators, proxies, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    proxy = proxies(profile(primary.url, fallback.url), reverse=primary.url)
    primary.set_faults(status=500)
    assert chat(proxy).headers["x-llm-ha-upstream"] == "fallback"
    proxy.wait_for(lambda s: s["upstreams"][0]["nodes"][0]["state"] == "ejected", timeout=5)

    screenshot = tmp_path / "dashboard.png"
    browser = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=3000",
         f"--screenshot={screenshot}", "--dump-dom", f"{proxy.status_url}/"],
        capture_output=True, text=True, timeout=60)
    assert browser.returncode == 0, browser.stderr[-3000:]
    dom = browser.stdout
    (tmp_path / "dashboard-dom.html").write_text(dom)
    assert screenshot.stat().st_size > 10_000, "the screenshot is kept beside the DOM in the test's tmp_path"

    parser = NodeRows()
    parser.feed(dom)
    ejected = parser.rows[("primary", primary.url)]
    assert ejected["row_state"] == "ejected"
    assert re.fullmatch(r"ejected \d+(\.\d)?s", ejected["state"]), ejected["state"]
    assert float(ejected["state"].split()[1][:-1]) > 50, "about 60 s left of a k=1 ejection"
    assert ejected["k"] == "1" and ejected["ejections"] == "1"
    assert ejected["failure_rate"].startswith("100% / 50%") or ejected["failure_rate"].startswith("50% / 50%")
    assert ejected["inflight"] == "0 / 4"
    healthy = parser.rows[("fallback", fallback.url)]
    assert healthy["row_state"] == "healthy" and healthy["state"] == "healthy"
    assert {"eject", "failover"} <= set(parser.events)
    assert 'id="conn" class="up"' in dom
