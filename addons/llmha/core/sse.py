"""Server-sent events, as OpenAI-compatible servers stream them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete events in `buffer`, and the incomplete rest."""
    events, start = [], 0
    for match in EVENT_END.finditer(buffer):
        events.append(buffer[start:match.start()])
        start = match.end()
    return events, buffer[start:]


def event_data(event: bytes) -> str | None:
    """The joined `data:` lines of one event; None for an event without data (a comment, a ping)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines).decode("utf-8", "replace") if lines else None


def iter_data(body: bytes) -> Iterator[str]:
    """Every event's data in a whole SSE body, the trailing partial event included."""
    events, rest = split_events(body)
    for event in [*events, rest]:
        data = event_data(event)
        if data is not None:
            yield data


def error_in(data: str) -> dict | None:
    """The error object when an event's data is an OpenAI-style error, else None."""
    if '"error"' not in data:
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    if isinstance(payload, dict) and payload.get("error") is not None:
        error = payload["error"]
        return error if isinstance(error, dict) else {"message": str(error)}
    return None
