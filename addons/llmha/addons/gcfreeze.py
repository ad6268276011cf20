"""Keeps Python's full garbage collections short: what exists once mitmproxy runs is frozen out of them.

A full (generation 2) collection walks every tracked object. In mitmdump most of them are created at
start-up and live as long as the process (modules, classes, functions, mitmproxy's and llm-ha's own
state): about 50-60 ms per full collection on the development machine, every streaming client stalled
meanwhile. Frozen (`gc.freeze`, after collecting the young garbage), they are no longer walked; a
full collection then walks only what came later. Objects frozen are never collected, which for
start-up's long-lived objects costs nothing. `llm_ha_gc_freeze false` leaves the collector alone.
"""

from __future__ import annotations

import gc
import logging
import time

from mitmproxy import ctx

logger = logging.getLogger("llm_ha")


class GcFreeze:
    def load(self, loader) -> None:
        loader.add_option("llm_ha_gc_freeze", bool, True,
                          "llm-ha: once mitmproxy runs, freeze the objects created so far out of Python's "
                          "full garbage collections (shorter pauses for every stream).")

    def running(self) -> None:
        if not ctx.options.llm_ha_gc_freeze:
            return
        started = time.perf_counter()
        gc.collect(1)  # the young garbage; a full collection here would delay the first answer by as much
        gc.freeze()
        logger.debug(f"llm-ha: {gc.get_freeze_count()} objects frozen out of full garbage collections "
                     f"in {1000 * (time.perf_counter() - started):.0f} ms")
