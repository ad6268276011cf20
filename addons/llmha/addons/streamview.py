"""The UI addon: the "LLM stream" content view in mitmproxy's console and web UI, and mitmweb's comment column.

llm-ha's comment on a flow says who answered (`fallback 83ms ← primary timeout 200ms`); mitmweb shows
it in its flow list once `comment` is among its `web_columns`, which this adds when it loads.
"""

from __future__ import annotations

import logging

from mitmproxy import contentviews, ctx

from ..contentview import llm_stream_view, remove_view

logger = logging.getLogger("llm_ha")


class StreamView:
    def load(self, loader) -> None:
        contentviews.add(llm_stream_view)

    def running(self) -> None:
        if "web_columns" in ctx.options and "comment" not in ctx.options.web_columns:
            ctx.options.update(web_columns=[*ctx.options.web_columns, "comment"])
            logger.info("llm-ha: added the comment column to mitmweb's flow list (web_columns)")

    def done(self) -> None:
        remove_view()
