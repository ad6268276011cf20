"""The `llm-ha` command, run in-process with click's runner (the installed command: test_wheel_e2e.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmha import cli

REPO = Path(__file__).resolve().parent.parent

PROFILE = """
match: "~u /v1/ & ~m POST"
first_byte_timeout: 200ms
health_check:
  failure_rate_threshold: 50
  interval: 1s
  base_ejection_time: 30s
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:8001", "http://127.0.0.1:8003"]
    max_inflight: 16
    adaptive: true
    min_inflight: 2
  - name: fallback
    nodes: ["https://llm.example.com/compatible-mode"]
    api_key: "${FALLBACK_KEY}"
    model: qwen-plus
    first_byte_timeout: 5s
"""


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli.cli, list(args), prog_name="llm-ha", env=env)


@pytest.fixture
def profile_file(tmp_path):
    def write(text: str = PROFILE) -> str:
        path = tmp_path / "profile.yaml"
        path.write_text(text)
        return str(path)
    return write


@pytest.mark.parametrize("command", sorted(cli.cli.commands))
def test_every_command_has_help_with_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: llm-ha {command} ")
    assert f"llm-ha {command}" in result.output.split("Examples:")[1]


def test_top_level_help_lists_the_commands_and_version_is_the_package_version():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("check", "run", "panel", "replay", "demo", "script-path"):
        assert f"  {command} " in result.output
    assert invoke("--version").output == f"llm-ha {importlib.metadata.version('llm-ha')}\n"


def test_check_summarises_a_valid_profile_in_one_paragraph(profile_file):
    result = invoke("check", profile_file(), env={"FALLBACK_KEY": "sk-do-not-show"})
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip()
    assert "\n" not in summary and "valid." in summary
    for expected in ("url matches", "method matches", "primary (2 nodes, http://127.0.0.1:8001, http://127.0.0.1:8003",
                     "first-byte timeout 200ms", "at most 16 in flight per node, adaptive from 2",
                     "fallback (1 node, https://llm.example.com/compatible-mode", "first-byte timeout 5s",
                     "model rewritten to 'qwen-plus'", "its own API key",
                     "failure rate of 50% or more is ejected for k x 30s (at most 300s)"):
        assert expected in summary, expected
    assert "sk-do-not-show" not in result.output


def test_check_explains_a_primary_without_nodes(profile_file):
    path = profile_file("upstreams:\n  - name: primary\n  - name: fallback\n    nodes: ['http://127.0.0.1:8002']\n")
    result = invoke("check", path)
    assert result.exit_code == 0, result.output
    assert "the reverse-proxy target (give `llm-ha run --reverse-target URL`)" in result.stdout
    result = invoke("check", path, "--reverse-target", "http://10.0.0.5:8000/")
    assert "1 node, http://10.0.0.5:8000;" in result.stdout


@pytest.mark.parametrize("text, key, error", [
    (PROFILE.replace("interval: 1s", "interval: fast"), "k", "health_check.interval: bad duration 'fast'"),
    (PROFILE.replace('"~u /v1/ & ~m POST"', '"~u ("'), "k", "match: not a valid mitmproxy filter expression"),
    (PROFILE, None, "upstreams[1].api_key: environment variable FALLBACK_KEY is not set"),
])
def test_check_fails_with_the_one_line_error(profile_file, text, key, error):
    path = profile_file(text)
    result = invoke("check", path, env={"FALLBACK_KEY": key})
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"llm-ha: {path}: ") and result.stderr.count("\n") == 1
    assert error in result.stderr


def test_check_fails_on_a_missing_file(tmp_path):
    result = invoke("check", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1 and "cannot read the profile" in result.stderr


def test_run_builds_mitmdump_arguments_in_front_of_the_primary(tmp_path):
    arguments = cli.mitmdump_arguments("p.yaml", "http://127.0.0.1:8001", 9000, "127.0.0.1", "127.0.0.1:9091",
                                       True, "events.jsonl", ("-w", "out.flows"))
    assert arguments[:6] == ["--mode", "reverse:http://127.0.0.1:8001", "--listen-host", "127.0.0.1",
                             "--listen-port", "9000"]
    assert arguments[6:8] == ["-s", str(cli.script_path())]
    assert f"llm_ha_profile={Path('p.yaml').resolve()}" in arguments
    assert "llm_ha_status=127.0.0.1:9091" in arguments and "llm_ha_panel=true" in arguments
    assert f"llm_ha_events={Path('events.jsonl').resolve()}" in arguments
    assert arguments[-2:] == ["-w", "out.flows"]


def test_run_listens_on_loopback_by_default():
    defaults = {p.name: p.default for p in cli.run.params}
    assert defaults["listen_host"] == "127.0.0.1" and defaults["port"] == 8080


def test_run_refuses_before_starting_anything(profile_file):
    no_primary_nodes = profile_file("upstreams:\n  - name: primary\n")
    result = invoke("run", no_primary_nodes)
    assert result.exit_code == 1 and "give the primary's server with --reverse-target URL" in result.stderr
    result = invoke("run", profile_file(), "--status", "9091", env={"FALLBACK_KEY": "k"})
    assert result.exit_code == 2 and "needs HOST:PORT" in result.stderr
    result = invoke("run", profile_file(PROFILE.replace("50", "150")), env={"FALLBACK_KEY": "k"})
    assert result.exit_code == 1 and "failure_rate_threshold" in result.stderr


def test_the_packaged_script_loads_the_same_addons_as_addons_llm_ha_py():
    """`llm-ha script-path` (llmha/scripts/llm_ha.py) and the repository's addons/llm_ha.py load the same addons."""
    def addon_types(path: Path) -> list[type]:
        spec = importlib.util.spec_from_file_location(f"_addons_of_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return [type(addon) for addon in module.addons]

    assert Path(invoke("script-path").stdout.strip()) == cli.script_path()
    assert addon_types(cli.script_path()) == addon_types(REPO / "addons" / "llm_ha.py")


def test_run_puts_mitmproxy_in_front_of_the_primarys_server_without_its_path(profile_file):
    assert cli.mode_target("https://llm.example.com/compatible-mode") == "https://llm.example.com"
    assert cli.mode_target("http://127.0.0.1:8001") == "http://127.0.0.1:8001"
    no_primary_nodes = profile_file("upstreams:\n  - name: primary\n")
    result = invoke("run", no_primary_nodes, "--reverse-target", "http://10.0.0.5:8000/v1")
    assert result.exit_code == 1 and "--reverse-target: needs a server without a path" in result.stderr
