"""Start a real mitmdump with llm-ha from tests, the demo and the benchmarks.

    with start_mitmdump(profile="profiles/x.yaml", reverse="http://127.0.0.1:8001") as proxy:
        ...  # proxy.url, proxy.status(), proxy.output()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from llmsim.control import free_port, poll_until, terminate


def _checkout_or_cwd() -> Path:
    """The git checkout this file is in; installed from a wheel, the current directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "addons" / "llm_ha.py").exists() else Path.cwd()


def _addon_script() -> Path:
    """The checkout's entry script, else the one shipped in the installed package (`llm-ha script-path`)."""
    script = Path(__file__).resolve().parents[2] / "addons" / "llm_ha.py"
    if script.exists():
        return script
    import llmha

    return Path(llmha.__file__).resolve().parent / "scripts" / "llm_ha.py"


REPO = _checkout_or_cwd()
ADDON = _addon_script()
STARTUP_TIMEOUT = 30.0


def mitmdump_command() -> list[str]:
    exe = Path(sys.executable).with_name("mitmdump")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


class MitmProcess:
    def __init__(self, process: subprocess.Popen, port: int, status_port: int | None, log_path: str) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.status_url = f"http://127.0.0.1:{status_port}" if status_port else None
        self.log_path = log_path

    def __enter__(self) -> MitmProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.status_url}/status", timeout=5) as response:
            return json.loads(response.read())

    def node(self, upstream: str, index: int = 0) -> dict:
        return next(u for u in self.status()["upstreams"] if u["name"] == upstream)["nodes"][index]

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.05) -> dict:
        """Poll /status until `predicate(status)` holds; the last status, or AssertionError."""
        return poll_until(self.status, predicate, timeout, interval, "the proxy's status")

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> str:
        terminate(self.process, timeout)
        return self.output()


def start_mitmdump(profile: str | os.PathLike | None, reverse: str | None = None, *,
                   options: dict | None = None, args: list[str] = (), status: bool = True,
                   confdir: str | None = None, env: dict | None = None,
                   wait: bool = True, log_path: str | None = None, terminal: bool = False,
                   script: str | os.PathLike = ADDON) -> MitmProcess:
    """mitmdump with llm-ha on a free port of 127.0.0.1; `wait=False` for a start meant to fail.

    `terminal=True` gives it a pseudo-terminal as stdout (what the live panel needs), copied to the log.
    """
    port = free_port()
    status_port = free_port() if status else None
    settings = {"listen_host": "127.0.0.1", "termlog_verbosity": "info"}
    if profile is not None:
        settings["llm_ha_profile"] = str(profile)
    if status_port:
        settings["llm_ha_status"] = f"127.0.0.1:{status_port}"
    if confdir:
        settings["confdir"] = confdir
    settings.update(options or {})
    command = [*mitmdump_command(), "-p", str(port), "-s", str(script)]
    if reverse:
        command += ["--mode", f"reverse:{reverse}"]
    for key, value in settings.items():
        command += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    command += list(args)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="llm-ha-mitmdump-", suffix=".log")
        os.close(fd)
    log = open(log_path, "wb")
    output = log
    if terminal:
        master, output = pty.openpty()
        fcntl.ioctl(output, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        threading.Thread(target=_copy_terminal, args=(master, log_path), daemon=True).start()
    child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=child_env, cwd=REPO)
    log.close()
    if terminal:
        os.close(output)
    proxy = MitmProcess(process, port, status_port, log_path)
    if wait:
        _wait_until_up(proxy)
    return proxy


def _copy_terminal(master: int, log_path: str) -> None:
    with open(log_path, "ab") as log:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            log.write(data)
    os.close(master)


def _wait_until_up(proxy: MitmProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"mitmdump exited with {proxy.process.returncode}:\n{proxy.output()}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            if proxy.status_url:
                proxy.status()
                return
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5):
                return
        time.sleep(0.1)
    proxy.stop()
    raise RuntimeError(f"mitmdump did not come up in {STARTUP_TIMEOUT}s:\n{proxy.output()}")
