"""What mitmproxy's `mode` option says about where flows go."""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy.proxy import mode_specs

_KINDS = {"reverse": mode_specs.ReverseMode, "upstream": mode_specs.UpstreamMode}


def mode_url(modes: Sequence[str], kind: str) -> str | None:
    """The reverse-proxy target (kind "reverse") or the upstream proxy (kind "upstream"), as a URL."""
    for spec in modes:
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, _KINDS[kind]) and mode.scheme in ("http", "https"):
            host, port = mode.address
            return f"{mode.scheme}://{host}:{port}"
    return None
