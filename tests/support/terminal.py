"""A terminal for tests: a private tmux server, its screen captured as text."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from llmsim.control import poll_until

# pytest imports readline, which leaves COLUMNS/LINES in the environment children inherit: a stale
# size makes a live panel wrap. Children started by tests get the real terminal's size instead.
CHILD_ENV = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}


class Tmux:
    """A private tmux server running one command in a `cols` x `rows` pane."""

    def __init__(self, command: str, cols: int = 160, rows: int = 40, cwd: Path | None = None) -> None:
        self.socket = f"llmha-test-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-x", str(cols), "-y", str(rows), f"{command}; echo EXIT $?; sleep 600",
                   cwd=cwd)

    def _tmux(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                                capture_output=True, text=True, timeout=10, cwd=cwd, env=CHILD_ENV)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def screen(self, history: bool = True) -> str:
        """The visible screen, with the scrollback above it when `history`."""
        return self._tmux("capture-pane", "-p", *(["-S", "-"] if history else []))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        return poll_until(self.screen, predicate, timeout, 0.1, "the screen")

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
