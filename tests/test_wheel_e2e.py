"""`pip install` of the built wheel gives a working `llm-ha` command, without the git checkout.

Offline by construction: the wheel is built from a copy of the sources with the project venv's
setuptools (`--no-build-isolation --no-index`), and installed with `--no-deps --no-index` into a fresh
venv (`python -m venv --without-pip`, pip driven from outside with `pip --python`). Its dependencies
(mitmproxy, httpx, click, ...) are the project venv's, reached through a `.pth` file listing that
venv's site-packages, after the fresh venv's own: so `llmha` itself comes from the wheel, never from
the checkout (a test checks it). Every command runs with the working directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import httpx
import pytest

from llmsim.control import free_port, poll_until, terminate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "addons", "sim", "bench")


class InstalledWheel:
    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.command = str(venv / "bin" / "llm-ha")
        self.python = str(venv / "bin" / "python")

    def run(self, *args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([self.command, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                              env=_clean_env(), **kwargs)


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH or virtualenv of the test run leaks into the installed command."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> InstalledWheel:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in the venv "
                                             "(the test extra installs it)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _check([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), "."],
           cwd=source)
    wheel = next((root / "dist").glob("llm_ha-*.whl"))
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    _check([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
           cwd=root)
    site_packages = subprocess.run([str(venv / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    Path(site_packages, "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return InstalledWheel(venv)


def _check(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=_clean_env())
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


def test_the_installed_command_runs_from_the_wheel_not_the_checkout(installed, tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert installed.run("--version", cwd=tmp_path).stdout == f"llm-ha {version}\n"
    script = Path(installed.run("script-path", cwd=tmp_path).stdout.strip())
    assert script.is_file() and script.is_relative_to(installed.venv)
    assert (script.parent.parent / "dashboard.html").is_file(), "the dashboard ships in the wheel as package data"
    where = subprocess.run([installed.python, "-c", "import llmha, llmsim; print(llmha.__file__, llmsim.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_clean_env()).stdout.split()
    assert where and all(Path(path).is_relative_to(installed.venv) for path in where), where
    for command in ("check", "run", "panel", "replay", "demo", "script-path"):
        result = installed.run(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Examples:" in result.stdout, (command, result.stderr)


def test_the_installed_check_validates_a_profile(installed, tmp_path):
    good = REPO / "profiles" / "local-two-upstreams.yaml"
    result = installed.run("check", str(good), cwd=tmp_path)
    assert result.returncode == 0 and "valid." in result.stdout and "fallback (1 node, http://127.0.0.1:8002" \
        in result.stdout, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("interval: 1s", "interval: soon"))
    result = installed.run("check", str(bad), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"llm-ha: {bad}: health_check.interval: bad duration 'soon' (use e.g. 200ms, 1s, 30s, " \
                            "or a positive number of seconds)\n"


def test_the_installed_run_proxies_a_request_to_the_primary(installed, simulators, tmp_path, confdir):
    primary = simulators("--no-physics")
    fallback = simulators("--preset", "fallback")
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"upstreams:\n  - name: primary\n  - name: fallback\n    nodes: ['{fallback.url}']\n")
    port, status_port = free_port(), free_port()
    log = tmp_path / "llm-ha-run.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [installed.command, "run", str(profile), "--port", str(port), "--status", f"127.0.0.1:{status_port}",
             "--reverse-target", primary.url, "--", "--set", f"confdir={confdir}"],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path, env=_clean_env())
    try:
        status = poll_until(lambda: _status(process, status_port, log), bool, 30, 0.1, "llm-ha run's status server")
        assert status["upstreams"][0]["nodes"][0]["url"] == primary.url
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 200 and response.headers["x-llm-ha-upstream"] == "primary"
        assert "data: [DONE]" in response.text
        assert "text/html" in httpx.get(f"http://127.0.0.1:{status_port}/", timeout=5).headers["content-type"]
    finally:
        terminate(process, 10)
    output = log.read_text()
    assert f"--listen-host 127.0.0.1 --listen-port {port}" in output.splitlines()[0], "listens on loopback by default"
    assert str(installed.venv) in output.splitlines()[0], "the script comes from the installed package"


def _status(process: subprocess.Popen, port: int, log: Path) -> dict | None:
    if process.poll() is not None:
        raise AssertionError(f"llm-ha run exited with {process.returncode}:\n{log.read_text()}")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).json()
    except httpx.HTTPError:
        return None
