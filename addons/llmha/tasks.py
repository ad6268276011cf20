"""Tasks started without being awaited, kept referenced until done (asyncio itself keeps only weak references)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

_running: set[asyncio.Future] = set()  # module-level: outlives an addon object replaced by a script reload


def background(coro: Coroutine) -> asyncio.Future:
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
