"""Shared fixtures: real simulators and a real mitmdump with llm-ha, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from llmbench.proxy import start_mitmdump
from llmsim.control import free_port, start_simulator


@pytest.fixture(scope="session")
def confdir(tmp_path_factory) -> str:
    """One mitmproxy confdir (CA files) for the whole run, so parallel starts do not race to create it."""
    return str(tmp_path_factory.mktemp("mitmproxy-conf"))


@pytest.fixture
def simulators():
    """`simulators("--preset", "fallback", ...)` starts one; all are stopped after the test."""
    started = []

    def start(*args: str):
        sim = start_simulator(*args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        with contextlib.suppress(Exception):
            sim.stop()


@pytest.fixture
def proxies(confdir, tmp_path):
    """`proxies(profile_text, reverse=..., options=...)` starts mitmdump with llm-ha; stopped after the test."""
    started = []

    def start(profile_text: str | None, reverse: str | None = None, **kwargs):
        profile = None
        if profile_text is not None:
            profile = tmp_path / f"profile-{len(started)}.yaml"
            profile.write_text(profile_text)
        proxy = start_mitmdump(profile, reverse, confdir=confdir, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    return free_port()


def fast_ideal(*extra: str) -> tuple[str, ...]:
    return ("--no-physics", *extra)


REPO = Path(__file__).resolve().parent.parent
