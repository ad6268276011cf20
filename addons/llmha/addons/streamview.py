"""The content view addon: registers the "LLM stream" view in mitmproxy's console and web UI."""

from __future__ import annotations

from mitmproxy import contentviews

from ..contentview import llm_stream_view, remove_view


class StreamView:
    def load(self, loader) -> None:
        contentviews.add(llm_stream_view)

    def done(self) -> None:
        remove_view()
