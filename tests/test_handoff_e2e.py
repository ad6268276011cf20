"""The hand-off as mitmproxy's other addons see it: a streamed answer's head, and a flow killed while it waits.

mitmproxy reads the hand-off's head while the gate still waits for the first token; the flow gets its
answer's head in `responseheaders`, ahead of every other addon. Real mitmdump with llm-ha and an
observer script loaded before llm-ha's, real simulators.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from llmbench.proxy import ADDON

pytestmark = pytest.mark.e2e

STREAM = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}

OBSERVER = '''
import asyncio, json, logging

class Observer:
    """Logs what `responseheaders` shows of each flow; kills a flow after KILL_AFTER_S, if set."""
    kill_after_s = KILL_AFTER_S

    def request(self, flow):
        if self.kill_after_s is not None:
            asyncio.get_running_loop().call_later(self.kill_after_s, lambda: flow.killable and flow.kill())

    def responseheaders(self, flow):
        seen = {"status": flow.response.status_code, "path": flow.request.path,
                "upstream": flow.response.headers.get("x-llm-ha-upstream"),
                "content_type": flow.response.headers.get("content-type"),
                "content_length": flow.response.headers.get("content-length"), "stream": bool(flow.response.stream)}
        logging.warning("observer: " + json.dumps(seen))

addons = [Observer()]
'''


def profile(primary: str, fallback: str, first_byte: str = "2s") -> str:
    return f"""
first_byte_timeout: {first_byte}
upstreams:
  - name: primary
    nodes: ["{primary}"]
  - name: fallback
    nodes: ["{fallback}"]
"""


def start_observed(proxies, tmp_path, profile_text: str, kill_after_s: float | None = None):
    """mitmdump with the observer script loaded first, llm-ha's after it."""
    observer = tmp_path / "observer.py"
    observer.write_text(OBSERVER.replace("KILL_AFTER_S", repr(kill_after_s)))
    return proxies(profile_text, script=observer, args=["-s", str(ADDON)])


def observed(proxy) -> list[dict]:
    return [json.loads(line.split("observer: ", 1)[1]) for line in proxy.output().splitlines() if "observer: " in line]


def test_other_addons_see_the_answers_head_and_the_clients_request_in_responseheaders(simulators, proxies, tmp_path):
    primary = simulators("--no-physics", "--status", "500")
    fallback = simulators("--preset", "fallback")
    proxy = start_observed(proxies, tmp_path, profile(primary.url, fallback.url))

    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=STREAM, timeout=10) as answer:
        body = answer.read()
    fallback.set_faults(status=500)
    failed = httpx.post(f"{proxy.url}/v1/chat/completions", json=STREAM, timeout=10)  # a whole answer: the error

    assert answer.status_code == 200 and answer.headers["x-llm-ha-upstream"] == "fallback" and b"[DONE]" in body
    streamed, whole = observed(proxy)
    assert streamed == {"status": 200, "path": "/v1/chat/completions", "upstream": "fallback",
                        "content_type": answer.headers["content-type"], "content_length": None, "stream": True}
    assert failed.status_code >= 500 and failed.json()["error"]
    assert whole == {"status": failed.status_code, "path": "/v1/chat/completions", "upstream": "none",
                     "content_type": "application/json", "content_length": str(len(failed.content)), "stream": False}


def test_a_flow_killed_while_waiting_for_its_first_token_stops_its_gate(simulators, proxies, tmp_path):
    primary = simulators("--no-physics", "--first-token-delay", "3")
    fallback = simulators("--preset", "fallback")
    proxy = start_observed(proxies, tmp_path, profile(primary.url, fallback.url, first_byte="5s"), kill_after_s=0.3)

    started = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=STREAM, timeout=10) as answer:
            answer.read()

    assert time.monotonic() - started < 2, "the kill ends the wait, not the first token 3 s later"
    primary.wait_for(lambda s: s["client_disconnects"] == 1 and s["in_flight"] == 0, timeout=2)
    assert fallback.stats()["requests"] == 0
    node = proxy.node("primary")
    assert node["failures"] == 0 and node["inflight"] == 0, node
    assert "killed ← primary cancelled" in proxy.output()
    assert "Traceback" not in proxy.output() and "not killable" not in proxy.output()
