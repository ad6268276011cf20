"""`llm-ha`: check a profile, run the proxy with it, watch it, evaluate recordings, run the demo.

    llm-ha check profiles/local-two-upstreams.yaml
    llm-ha run profiles/local-two-upstreams.yaml --reverse-target http://127.0.0.1:8001 --status 127.0.0.1:9091
    llm-ha panel 127.0.0.1:9091

Heavy imports (mitmproxy, rich) happen inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit, urlunsplit

import click

if TYPE_CHECKING:
    from .core.profile import Profile, Upstream

# Stands in for the reverse-proxy target while checking a profile whose primary has no `nodes`.
REVERSE_TARGET_PLACEHOLDER = "http://reverse-proxy-target.invalid"
DEFAULT_PORT = 8080


def script_path() -> Path:
    """The mitmproxy entry script shipped inside the package."""
    return Path(__file__).resolve().parent / "scripts" / "llm_ha.py"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llm-ha", prog_name="llm-ha", message="%(prog)s %(version)s")
def cli() -> None:
    """Keep a self-hosted LLM service available: llm-ha runs mitmproxy in front of it with a first-byte
    timeout, transparent failover, passive health checking and concurrency limits.

    \b
    Examples:
      llm-ha check profiles/local-two-upstreams.yaml
      llm-ha run profiles/vllm-to-openai.yaml --status 127.0.0.1:9091
      llm-ha panel 127.0.0.1:9091
      mitmweb --mode reverse:http://127.0.0.1:8001 -s "$(llm-ha script-path)" --set llm_ha_profile=mine.yaml
    """


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="llm-ha")


# -- check ------------------------------------------------------------------------------------------

reverse_target_option = click.option(
    "--reverse-target", metavar="URL",
    help="The server the primary's nodes stand for when the profile omits them (default: its first node).")


@cli.command(short_help="Validate a profile offline.")
@click.argument("profile")
@reverse_target_option
def check(profile: str, reverse_target: str | None) -> None:
    """Validate PROFILE offline (nothing is contacted): exit 0 and a summary of what it does, or exit 1
    with the one-line error. `${VAR}` references are read from the environment, as `run` will.

    \b
    Examples:
      llm-ha check profiles/local-two-upstreams.yaml
      llm-ha check mine.yaml --reverse-target http://10.0.0.5:8000
      PRIMARY_KEY=... llm-ha check profiles/pai-eas-to-bailian.yaml && echo deployable
    """
    loaded = load_checked(profile, reverse_target)
    click.echo(describe_profile(loaded))


def load_checked(path: str, reverse_target: str | None) -> Profile:
    """The profile, valid including its `match` filter; exits 1 with the one-line error otherwise."""
    from mitmproxy import flowfilter

    from .core.profile import ProfileError, load_profile

    try:
        profile = load_profile(path, reverse_target=reverse_target or REVERSE_TARGET_PLACEHOLDER)
    except ProfileError as e:
        fail(str(e))
    try:
        flowfilter.parse(profile.match)
    except ValueError as e:
        fail(f"{path}: match: not a valid mitmproxy filter expression ({e})")
    return profile


def fail(message: str) -> NoReturn:
    click.echo(f"llm-ha: {message}", err=True)
    sys.exit(1)


def describe_profile(profile: Profile) -> str:
    """One paragraph: what the profile selects, where requests go, and when nodes are ejected."""
    from mitmproxy import flowfilter

    hc = profile.health_check
    upstreams = "; then ".join(_describe_upstream(u) for u in profile.upstreams)
    sentences = [
        f"{profile.path}: valid.",
        f"LLM flows: those whose {flowfilter.parse(profile.match)} (match {profile.match!r}); "
        "everything else passes through untouched.",
        f"Upstreams, tried in this order (the first is the primary): {upstreams}.",
        f"A node with at least {hc.min_requests} finished attempt{'s' if hc.min_requests != 1 else ''} in a "
        f"{_duration(hc.interval)} interval and a failure rate of {hc.failure_rate_threshold:g}% or more is "
        f"ejected for k x {_duration(hc.base_ejection_time)} (at most {_duration(hc.max_ejection_time)}); "
        f"k drops by one per {_duration(hc.k_decay_period)} of health.",
        "Transparent failover: on, a failed or late attempt is retried on the next candidate before the "
        "client sees a byte." if profile.transparent_failover else
        "Transparent failover: off, one attempt per request.",
    ]
    shared = getattr(profile, "shared_state", None)
    if shared:
        sentences.append(f"State is shared with every instance of this profile through {_masked(str(shared))}.")
    return " ".join(sentences)


def _describe_upstream(upstream: Upstream) -> str:
    if upstream.nodes == (REVERSE_TARGET_PLACEHOLDER,):
        nodes = "1 node, the reverse-proxy target (give `llm-ha run --reverse-target URL`)"
    else:
        nodes = f"{len(upstream.nodes)} node{'s' if len(upstream.nodes) != 1 else ''}, {', '.join(upstream.nodes)}"
    details = [f"first-byte timeout {_duration(upstream.first_byte_timeout)}",
               f"request timeout {_duration(upstream.request_timeout)}"]
    for name in ("stream_idle_timeout", "request_deadline"):  # 0.2 keys, when this version has them
        if value := getattr(upstream, name, None):
            details.append(f"{name.replace('_', ' ')} {_duration(value)}")
    if upstream.model:
        details.append(f"model rewritten to {upstream.model!r}")
    if upstream.api_key:
        auth = getattr(upstream, "auth", "bearer")
        details.append("its own API key" + ("" if auth == "bearer" else f" sent as {auth}"))  # never the key itself
    if (protocols := getattr(upstream, "protocols", ("openai",))) != ("openai",):
        details.append(f"speaks {', '.join(protocols)}")
    if upstream.max_inflight is not None:
        limit = f"at most {upstream.max_inflight} in flight per node"
        if upstream.adaptive:
            limit += f", adaptive from {upstream.min_inflight}"
        if upstream.slow_start:
            limit += f", slow start over {_duration(upstream.slow_start)}"
        details.append(limit)
    return f"{upstream.name} ({nodes}; {', '.join(details)})"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:" if parts.username else ":"
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- run --------------------------------------------------------------------------------------------


def _listen_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .core.status import parse_listen_address

    if value:
        try:
            parse_listen_address(value)
        except ValueError:
            raise click.BadParameter(f"needs HOST:PORT, e.g. 127.0.0.1:9091, got {value!r}") from None
    return value


@cli.command(short_help="Run the proxy (mitmdump) with a profile.")
@click.argument("profile")
@click.argument("mitmdump_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- MITMDUMP_ARGS...]")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port the proxy listens on.")
@click.option("--listen-host", default="127.0.0.1", show_default=True,
              help="Address the proxy listens on (0.0.0.0: every interface).")
@click.option("--status", metavar="HOST:PORT", callback=_listen_address,
              help="Serve the dashboard (GET /), GET /status and GET /metrics here; no authentication: "
                   "keep it on loopback.")
@click.option("--panel", is_flag=True, help="Pin the live panel at the bottom of the terminal.")
@click.option("--events", metavar="PATH", type=click.Path(dir_okay=False), help="Write the JSON-lines event log here.")
@reverse_target_option
def run(profile: str, mitmdump_args: tuple[str, ...], port: int, listen_host: str, status: str | None,
        panel: bool, events: str | None, reverse_target: str | None) -> None:
    """Run mitmdump in reverse-proxy mode in front of PROFILE's primary, with llm-ha. Point OpenAI-compatible
    clients at http://LISTEN_HOST:PORT/v1. Arguments after `--` go to mitmdump as they are.

    \b
    Examples:
      llm-ha run profiles/local-two-upstreams.yaml --reverse-target http://127.0.0.1:8001
      llm-ha run mine.yaml --port 9000 --status 127.0.0.1:9091 --panel
      llm-ha run mine.yaml --listen-host 0.0.0.0 -- -w traffic.flows --set termlog_verbosity=warn
    """
    loaded = load_checked(profile, reverse_target)
    primary = loaded.upstreams[0].nodes[0]
    if primary == REVERSE_TARGET_PLACEHOLDER:
        fail(f"{profile}: upstreams[0].nodes: missing; give the primary's server with --reverse-target URL")
    if primary == (reverse_target or "").rstrip("/") and mode_target(primary) != primary:
        fail(f"--reverse-target: needs a server without a path (mitmproxy's reverse mode), got {reverse_target!r}")
    arguments = mitmdump_arguments(profile, mode_target(primary), port, listen_host, status, panel, events,
                                   mitmdump_args)
    click.echo(f"llm-ha: mitmdump {shlex.join(arguments)}", err=True)
    from mitmproxy.tools.main import mitmdump

    mitmdump(arguments)


def mitmdump_arguments(profile: str, reverse_target: str, port: int, listen_host: str, status: str | None,
                       panel: bool, events: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    settings = {"llm_ha_profile": str(Path(profile).resolve())}
    if status:
        settings["llm_ha_status"] = status
    if panel:
        settings["llm_ha_panel"] = "true"
    if events:
        settings["llm_ha_events"] = str(Path(events).resolve())
    arguments = ["--mode", f"reverse:{reverse_target}", "--listen-host", listen_host, "--listen-port", str(port),
                 "-s", str(script_path())]
    for key, value in settings.items():
        arguments += ["--set", f"{key}={value}"]
    return [*arguments, *extra]


def mode_target(url: str) -> str:
    """scheme://host:port: mitmproxy's reverse mode takes no path (llm-ha's gate adds the node's own)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


@cli.command("script-path", short_help="Print the path of the mitmproxy script (-s).")
def script_path_command() -> None:
    """Print the path of the mitmproxy script inside the installed package, for mitmproxy's own tools.

    \b
    Examples:
      mitmproxy --mode reverse:http://127.0.0.1:8001 -s "$(llm-ha script-path)" \\
          --set llm_ha_profile=profiles/local-two-upstreams.yaml --set llm_ha_status=127.0.0.1:9091
      mitmweb --mode reverse:http://127.0.0.1:8001 -s "$(llm-ha script-path)" --set llm_ha_profile=mine.yaml
    """
    click.echo(str(script_path()))


# -- the existing tools under one name ---------------------------------------------------------------


@cli.command(short_help="Live panel of a running llm-ha, in this terminal.")
@click.argument("address")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Seconds between polls.")
@click.option("--once", is_flag=True, help="Print one frame and exit (1 if unreachable).")
def panel(address: str, interval: float, once: bool) -> None:
    """Live view of a running llm-ha's status server at ADDRESS (HOST:PORT, as given to --status or
    llm_ha_status), in this terminal; survives the proxy restarting. A browser shows the same at
    http://ADDRESS/.

    \b
    Examples:
      llm-ha panel 127.0.0.1:9091
      llm-ha panel 127.0.0.1:9091 --once
    """
    from .panel import main as panel_main

    sys.exit(panel_main([address, "--interval", str(interval), *(["--once"] if once else [])]))


@cli.command(short_help="What-if evaluation of a recording against a profile.")
@click.argument("flows", type=click.Path(dir_okay=False))
@click.option("--profile", required=True, type=click.Path(dir_okay=False), help="The profile to evaluate with.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--png", type=click.Path(dir_okay=False),
              help="Write the TTFB/ejection timeline here (needs matplotlib).")
@reverse_target_option
@click.option("--quiet", is_flag=True, help="Do not print the table.")
def replay(flows: str, profile: str, report: str | None, png: str | None, reverse_target: str | None,
           quiet: bool) -> None:
    """What-if evaluation of a recording (mitmdump -w FLOWS): when would PROFILE's health check have
    ejected each node? Offline: nothing is sent.

    \b
    Examples:
      llm-ha replay traffic.flows --profile profiles/local-two-upstreams.yaml --reverse-target http://127.0.0.1:8001
      llm-ha replay traffic.flows --profile strict.yaml --report report.json --png report.png
    """
    from .replay import main as replay_main

    argv = [flows, "--profile", profile]
    for flag, value in (("--report", report), ("--png", png), ("--reverse-target", reverse_target)):
        if value:
            argv += [flag, value]
    sys.exit(replay_main(argv + (["--quiet"] if quiet else [])))


DEMO_MODULE = "llmbench.demo"


@cli.command(short_help="The traffic-spike demo with simulated upstreams.",
             context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("demo_args", nargs=-1, type=click.UNPROCESSED)
def demo(demo_args: tuple[str, ...]) -> None:
    """The traffic-spike demo: a simulated primary that crashes when overloaded, a simulated fallback, and
    llm-ha in front, under a seeded spike (about 90 s). Arguments go to the demo itself.

    \b
    Examples:
      llm-ha demo
      llm-ha demo --scale 4 --no-panel
      llm-ha demo -- --help        # the demo's own options
    """
    import importlib

    try:
        module = importlib.import_module(DEMO_MODULE)
    except ImportError as e:
        fail(f"the demo needs the simulator and benchmark packages and openai ({e}); "
             "from a checkout: pip install -e '.[test]'")
    sys.exit(module.main(list(demo_args)))


if __name__ == "__main__":
    main()
