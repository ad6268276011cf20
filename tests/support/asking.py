"""A chat completion asked through a proxy, and who served it (the `x-llm-ha-*` headers)."""

from __future__ import annotations

import httpx


def chat(proxy, stream: bool = True) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 4}
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=10)


def served(response: httpx.Response) -> tuple[str, str]:
    """(upstream, attempts) of a successful answer."""
    assert response.status_code == 200, response.text
    return response.headers["x-llm-ha-upstream"], response.headers["x-llm-ha-attempts"]
