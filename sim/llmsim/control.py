"""Start simulator processes from tests and scripts, and talk to their control port.

    with start_simulator("--preset", "fallback") as fallback:
        ...  # fallback.url, fallback.stats(), fallback.set_faults(status=429), fallback.crash()
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll_until(fetch: Callable[[], Any], predicate: Callable[[Any], bool], timeout: float, interval: float,
               what: str) -> Any:
    """Call `fetch` until `predicate(result)` holds; AssertionError naming `what` and the last result if not in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not as expected after {timeout} s:\n{value}")
        time.sleep(interval)


def terminate(process: subprocess.Popen, timeout: float) -> None:
    """Terminate, wait, kill if it does not go."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class SimulatorError(RuntimeError):
    pass


class SimProcess:
    """A running `python -m llmsim.server`; see `start_simulator`."""

    def __init__(self, process: subprocess.Popen, startup: dict, stderr_path: str) -> None:
        self.process = process
        self.startup = startup
        self.url: str = startup["listening"]
        self.control_url: str = startup["control"]
        self.model: str = startup["model"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.control_port = int(self.control_url.rsplit(":", 1)[1])
        self._stderr_path = stderr_path

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SimProcess {self.model} {self.url} pid={self.process.pid}>"

    # -- control
    def stats(self) -> dict:
        return self._control("GET", "/_sim/stats")

    def faults(self) -> dict:
        return self._control("GET", "/_sim/faults")

    def set_faults(self, **faults: Any) -> dict:
        """Change fault switches (see llmsim.server); returns all of them."""
        return self._control("POST", "/_sim/faults", faults)

    def clear_faults(self) -> dict:
        return self.set_faults(error_rate=0.0, status=None, in_band_error=False, first_token_delay=0.0,
                               reset_after_chunks=None, refuse=False, slow_start=0.0, stall_after_chunks=None,
                               stall_seconds=60.0, stall_keepalive=False, no_done=False, prefill="any")

    def crash(self) -> dict:
        return self._control("POST", "/_sim/crash")

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0, interval: float = 0.05) -> dict:
        """Poll the stats until `predicate(stats)` holds; AssertionError with the last stats if not in time."""
        return poll_until(self.stats, predicate, timeout, interval, "simulator stats")

    def _control(self, method: str, path: str, body: Any = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.control_url + path, data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise SimulatorError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from None

    # -- process
    def stderr(self) -> str:
        with open(self._stderr_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 5.0) -> None:
        terminate(self.process, timeout)
        if self.process.stdout:
            self.process.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(self._stderr_path)


def start_simulator(*args: str, timeout: float = STARTUP_TIMEOUT, env: dict | None = None) -> SimProcess:
    """Start `python -m llmsim.server --port 0 ARGS...` and wait for its startup line.

    A later `--port` in ARGS wins over the `--port 0` put first. Raises SimulatorError with the
    process's stderr if it exits or stays silent for `timeout` seconds.
    """
    stderr_file = tempfile.NamedTemporaryFile(prefix="llmsim-", suffix=".stderr", delete=False)
    command = [sys.executable, "-m", "llmsim.server", "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL,
                               env=env)
    stderr_file.close()
    try:
        line = _read_line(process, timeout)
        startup = json.loads(line)
    except (SimulatorError, ValueError) as exc:
        if process.poll() is None:
            process.kill()
        process.wait()
        with open(stderr_file.name, errors="replace") as f:
            stderr = f.read()
        os.unlink(stderr_file.name)
        raise SimulatorError(f"{' '.join(command)} did not start: {exc}\n--- its stderr ---\n{stderr}") from None
    return SimProcess(process, startup, stderr_file.name)


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, waiting at most `timeout` seconds."""
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SimulatorError(f"no startup line within {timeout} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.1))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise SimulatorError(f"it exited with code {process.wait()}")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()
