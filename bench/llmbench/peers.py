"""The gateways llm-ha is measured against, started and stopped for real on 127.0.0.1.

    settings = Settings.of(REFERENCE, scale=1.0)  # the document's values: 50 %, 1 s, 30 s, 200 ms
    with start_peer("nginx", primary.url, fallback.url, settings, workdir) as peer:
        ...  # peer.url (the client uses peer.url + "/v1"), peer.cpu_seconds(), peer.peak_rss_kib()

Peers (`PEERS`):

* `llm-ha`: mitmdump with the addon and the reference profile (`start_mitmdump`), the profile of
  bench-spike's "llm-ha" variant (`scenario.profile_text`); `llm-ha-limits`: the same plus the
  concurrency limits (bench-spike's "limits" variant).
* `mitmdump`: mitmdump without the addon, a reverse proxy to the primary only: mitmproxy's own cost.
* `nginx`: Debian's nginx as a child process (`nginx -p DIR -c nginx.conf -g 'daemon off;'`, its own
  process group, pid, logs and temp files in DIR), an `upstream` with the fallback as `backup`, and
  the first-byte timeout as proxy_read_timeout (200 ms); `nginx-1s`: the same with
  proxy_read_timeout 1s, because below ~300 ms nginx's read timeout cuts every stream (see below).
* `litellm`: the LiteLLM proxy (`litellm[proxy]`, pinned to `LITELLM_VERSION`) from its own virtual
  environment, `.venv-litellm` beside the project's `.venv` (the project's `.venv` is never touched),
  with a router config.
* `direct`: no process; the client goes straight to the primary (the reference for overheads).

nginx and LiteLLM are used as installed; `python -m llmbench.peers --install-nginx --install-litellm`
(`make peers`) installs them, and so does bench-peers unless `--no-install`. Nothing here installs unless
asked to (`install=True`): the tests only use what is there.

How each of the reference settings maps onto nginx and LiteLLM, and what has no equivalent, is in
`MAPPINGS` (printed by `python -m llmbench.bench_peers --mappings`).

Every process started here is stopped by `Peer.stop()` (its whole process group: nginx's workers,
LiteLLM's), by the context manager, and at interpreter exit for any still running.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from llmsim.control import free_port

from .proxy import REPO, start_mitmdump
from .scenario import REFERENCE, VARIANTS, Reference, profile_text

PEERS = ("llm-ha", "llm-ha-limits", "llm-ha-resume", "mitmdump", "nginx", "nginx-1s", "litellm")
TITLES = {
    "direct": "direct (no gateway)",
    "llm-ha": "llm-ha (reference profile)",
    "llm-ha-limits": "llm-ha + limits",
    "llm-ha-resume": "llm-ha + resume",
    "mitmdump": "mitmdump, no addon",
    "nginx": "nginx (read timeout 200 ms)",
    "nginx-1s": "nginx (read timeout 1 s)",
    "litellm": "LiteLLM proxy",
}
# nginx-1s: nginx cannot bound only the first byte; proxy_read_timeout bounds every read, and nginx does
# not re-arm a timer whose new deadline is within 300 ms of the old one (NGX_TIMER_LAZY_DELAY), so
# below ~300 ms it becomes a deadline for the whole response: 200 ms cuts every stream longer than that.
# 1 s is a value a user would pick instead: above the longest gap between two chunks of a busy primary
# (a batch's prefill, ~0.4 s) plus those 300 ms.
NGINX_PRACTICAL_READ_TIMEOUT = 1.0

# 1.82.6 is the last LiteLLM release before the PyPI account takeover of March 2026 (1.82.7 and 1.82.8
# carried a credential stealer and were withdrawn). Pinned, never "latest"; `_check_litellm_install`
# also refuses a venv holding the stealer's .pth start-up hook.
LITELLM_VERSION = "1.82.6"
LITELLM_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
LITELLM_VENV = Path(os.environ.get("LLM_HA_LITELLM_VENV", REPO / ".venv-litellm"))
INSTALL_TIMEOUT = 900.0
STARTUP_TIMEOUT = 120.0
PRIMARY_MODEL = "DeepSeek-R1-Distill-Qwen-7B"  # the model name clients ask for (loadgen.DEFAULT_MODEL)
FALLBACK_GROUP = "fallback"

LITELLM_LOGGING = {  # uvicorn's logging config for LiteLLM: warnings only, no access log
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                "uvicorn.error": {"level": "WARNING"},
                "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
}

_LIVE: set[Peer] = set()


class PeerUnavailable(RuntimeError):
    """The peer cannot be installed or started here; the message says why and what would fix it."""


# -- the reference profile, as each peer takes it

# The fixed failure count that stands in for "failure rate >= 50 % in a 1 s interval" in nginx
# (max_fails) and LiteLLM (allowed_fails + 1): with min_requests 1, a single failed attempt alone in
# its interval ejects a node in llm-ha, so 1 is the closest count (and the most eager one).
FAILURES_TO_EJECT = 1


@dataclass(frozen=True)
class Settings:
    """The reference settings in wall seconds at one time scale (`scenario.Reference` times `scale`)."""

    first_byte_timeout: float
    fallback_first_byte_timeout: float
    request_timeout: float
    interval: float
    base_ejection_time: float
    max_ejection_time: float
    failure_rate_threshold: float
    scale: float

    @classmethod
    def of(cls, ref: Reference = REFERENCE, scale: float = 1.0) -> Settings:
        return cls(first_byte_timeout=ref.first_byte_timeout * scale,
                   fallback_first_byte_timeout=ref.fallback_first_byte_timeout * scale,
                   request_timeout=ref.request_timeout * scale, interval=ref.interval * scale,
                   base_ejection_time=ref.base_ejection_time * scale,
                   max_ejection_time=ref.max_ejection_time * scale,
                   failure_rate_threshold=ref.failure_rate_threshold, scale=scale)


def llm_ha_profile(variant: str, s: Settings, fallback_url: str, ref: Reference = REFERENCE) -> str:
    """The llm-ha profile of bench-spike's variant `variant` ("llm-ha": the reference profile;
    "limits": plus the concurrency limits), at the same time scale."""
    return profile_text(VARIANTS[variant], s.scale, fallback_url, ref)


# What every nginx config of the benchmarks opens with: logs and temp files in its own prefix folder.
NGINX_PRELUDE = """error_log logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
"""


def nginx_conf(ref: Settings, primary_url: str, fallback_url: str, port: int,
               read_timeout: float | None = None) -> str:
    """nginx.conf for `nginx -p DIR`: everything relative to DIR, listening on 127.0.0.1 only.
    `read_timeout` (wall seconds) replaces the first-byte timeout as proxy_read_timeout."""
    read_timeout = ref.first_byte_timeout if read_timeout is None else read_timeout

    def ms(seconds: float) -> str:
        return f"{max(1, round(seconds * 1000))}ms"

    def hostport(url: str) -> str:
        return url.split("://", 1)[1].rstrip("/")

    return f"""\
# written by llmbench.peers: the reference profile mapped onto nginx (see llmbench.peers.MAPPINGS)
worker_processes 1;
pid nginx.pid;
{NGINX_PRELUDE}    upstream llm {{
        server {hostport(primary_url)} max_fails={FAILURES_TO_EJECT} fail_timeout={max(1, round(ref.base_ejection_time))}s;
        server {hostport(fallback_url)} backup;
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 10m;
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;  # stream the answer; request buffering stays on, so the body can be re-sent
            proxy_connect_timeout {ms(ref.first_byte_timeout)};
            proxy_send_timeout {ms(ref.first_byte_timeout)};
            proxy_read_timeout {ms(read_timeout)};
            proxy_next_upstream error timeout http_500 http_502 http_503 http_429 non_idempotent;
        }}
    }}
}}
"""


def litellm_config(ref: Settings, primary_url: str, fallback_url: str) -> dict:
    """The LiteLLM proxy config (as a dict; JSON is valid YAML): two deployments, fallbacks, cooldown."""
    def deployment(name: str, model: str, url: str, stream_timeout: float) -> dict:
        return {"model_name": name, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{url}/v1", "api_key": "sk-llmsim",
            "stream_timeout": stream_timeout, "timeout": ref.request_timeout, "max_retries": 0}}

    return {
        "model_list": [
            deployment(PRIMARY_MODEL, PRIMARY_MODEL, primary_url, ref.first_byte_timeout),
            deployment(FALLBACK_GROUP, "qwen-plus", fallback_url, ref.fallback_first_byte_timeout),
        ],
        "router_settings": {
            "num_retries": 0,
            "timeout": ref.request_timeout,
            "stream_timeout": ref.first_byte_timeout,
            "allowed_fails": FAILURES_TO_EJECT - 1,
            "cooldown_time": ref.base_ejection_time,
            "fallbacks": [{PRIMARY_MODEL: [FALLBACK_GROUP]}],
            "retry_after": 0,
        },
        "litellm_settings": {"num_retries": 0, "request_timeout": ref.request_timeout},
    }


# What each reference setting became in each peer; llm-ha takes them as they are.
MAPPINGS: list[tuple[str, str, str]] = [
    ("first-byte timeout 200 ms (fallback: 5 s)",
     "proxy_read_timeout 200ms (connect and send timeouts 200ms too); proxy_next_upstream timeout moves on. "
     "It bounds every read, not only the first byte, and one value holds for every server (the backup gets "
     "200 ms, not 5 s). Below ~300 ms it is a deadline for the whole response: nginx keeps a timer whose new "
     "deadline is within 300 ms of the old (NGX_TIMER_LAZY_DELAY), so every stream longer than 200 ms is cut. "
     "'nginx 1s' is the value a user would pick instead: proxy_read_timeout 1s",
     "stream_timeout: 0.2 on the primary deployment, 5 on the fallback (router_settings.stream_timeout 0.2); "
     "an httpx timeout, so it bounds connect and every read of the stream, not only the first byte"),
    ("failure rate threshold 50 %, interval 1 s, min_requests 1",
     "no rate, no interval: max_fails=1, a count of failures within fail_timeout (a lone failed attempt in "
     "its interval ejects in llm-ha, so 1 is the closest count)",
     "no rate, no interval: allowed_fails: 0, cooldown once the failures within cooldown_time exceed it. "
     "LiteLLM's own rate rule (over 50 % of a minute's calls, at least 5 calls) applies only to model groups "
     "of several deployments and only when allowed_fails is not set"),
    ("base ejection time 30 s",
     "fail_timeout=30s: both the window for max_fails and the time the server is out (whole seconds only)",
     "cooldown_time: 30: the time out, and the window in which allowed_fails are counted"),
    ("k x base ejection, max 300 s, k decays while healthy",
     "none: every ejection lasts fail_timeout", "none: every cooldown lasts cooldown_time"),
    ("fallback provider (own URL, API key, model)",
     "`backup` server of the same upstream; the request is passed as is: no per-server API key or model "
     "rewrite (the fallback gets the client's model name and key), one URL path for both",
     "fallbacks: [{primary: [fallback]}], a second model group with its own api_base, api_key, model"),
    ("retry on the next candidate before any byte reaches the client",
     "proxy_next_upstream error timeout http_500 http_502 http_503 http_429 non_idempotent (without "
     "non_idempotent a POST that reached the server is never retried; with proxy_request_buffering off nginx "
     "cannot re-send the body and answers 504 instead)",
     "num_retries: 0 (no second try on the same deployment), then the fallback group; max_retries: 0 for "
     "the openai client inside"),
    ("connection refused or reset counts as a failure", "yes (error)",
     "retried on the fallback, but never starts a cooldown: LiteLLM skips cooldown for APIConnectionError, "
     "so a dead primary is tried first on every request"),
    ("a stream broken after the first byte", "the client sees the stream break",
     "the client gets finish_reason \"stop\" and [DONE]: a truncated answer that looks complete"),
    ("in-band error (200 + error event) counts as a failure", "no", "no"),
    ("request timeout 600 s (non-streaming)", "no separate one: proxy_read_timeout", "timeout: 600"),
    ("concurrency limits (llm-ha + limits: max_inflight 16, adaptive, slow start)",
     "max_conns=16 would queue or fail, not shed to the backup; not set (the reference profile has none)",
     "max_parallel_requests / rpm per deployment; not set (the reference profile has none)"),
]


# -- processes

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    children, tree, todo = _children_map(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stop_group(process: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group led by `process`, wait, then SIGKILL the group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (workers) of the group, even after the leader
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)


class Peer:
    """A started gateway: `url` (no /v1), resource readings of its process tree, `stop()`."""

    name: str = ""

    def __init__(self, url: str, pid: int | None, log_path: str | None) -> None:
        self.url = url
        self.pid = pid
        self.log_path = log_path
        self._pids_seen: set[int] = set()
        self._hwm: dict[int, int] = {}
        _LIVE.add(self)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url} pid={self.pid}>"

    def pids(self) -> list[int]:
        if self.pid is None:
            return []
        tree = process_tree(self.pid)
        self._pids_seen.update(tree)
        return tree

    def cpu_seconds(self) -> float:
        """CPU seconds of the live process tree (nginx master + worker, LiteLLM and its workers)."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def peak_rss_kib(self) -> int:
        """Sum over the tree of each process's VmHWM, the largest ever read (it survives a worker's exit)."""
        for pid in self.pids():
            self._hwm[pid] = max(self._hwm.get(pid, 0), peak_rss_kib(pid))
        return sum(self._hwm.values())

    def output(self) -> str:
        if not self.log_path:
            return ""
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text(errors="replace")
        return ""

    def stop(self) -> None:
        _LIVE.discard(self)


class DirectPeer(Peer):
    name = "direct"

    def __init__(self, primary_url: str) -> None:
        super().__init__(primary_url, None, None)


class MitmPeer(Peer):
    """mitmdump with llm-ha (`variant`: bench-spike's "llm-ha" or "limits"), or, with `variant=None`, a plain
    reverse proxy to the primary."""

    def __init__(self, primary_url: str, fallback_url: str, settings: Settings, workdir: Path,
                 variant: str | None, events: bool = True, confdir: str | os.PathLike | None = None) -> None:
        self.name = {None: "mitmdump", "llm-ha": "llm-ha", "limits": "llm-ha-limits", "resume": "llm-ha-resume"}[variant]
        addon = variant is not None
        profile = None
        self.events_path = workdir / f"{self.name}-events.jsonl" if addon and events else None
        if addon:
            profile = workdir / f"{self.name}-profile.yaml"
            profile.write_text(llm_ha_profile(variant, settings, fallback_url))
        confdir = Path(confdir) if confdir else workdir / "mitmproxy-conf"
        confdir.mkdir(parents=True, exist_ok=True)
        options = {"flow_detail": 0, "termlog_verbosity": "warn"}
        if not addon:
            # Without this mitmproxy holds a response until it is complete: a stream's first token would
            # reach the client with its last. llm-ha streams by itself (its hand-off).
            options["stream_large_bodies"] = "1"
        if self.events_path is not None:
            self.events_path.unlink(missing_ok=True)
            options["llm_ha_events"] = str(self.events_path)
        self.proxy = start_mitmdump(profile, reverse=primary_url, status=addon, confdir=str(confdir),
                                    options=options, log_path=str(workdir / f"{self.name}.log"))
        super().__init__(self.proxy.url, self.proxy.process.pid, self.proxy.log_path)

    def stop(self) -> None:
        try:
            self.peak_rss_kib()
            self.proxy.stop()
        finally:
            super().stop()


class GroupPeer(Peer):
    """A peer run as the leader of its own process group, stopped with its whole group."""

    stop_signal = signal.SIGTERM

    def __init__(self, command: list[str], port: int, workdir: Path, env: dict | None, ready_path: str) -> None:
        log_path = workdir / f"{self.name}.log"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=workdir, env=env, start_new_session=True)
        super().__init__(f"http://127.0.0.1:{port}", self.process.pid, str(log_path))
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    response.read()
                    return
            time.sleep(0.2)
        raise PeerUnavailable(f"{self.name} did not answer {path} within {STARTUP_TIMEOUT:.0f} s:\n"
                              f"{self.output()[-3000:]}")

    def stop(self) -> None:
        try:
            self.peak_rss_kib()
            _stop_group(self.process, sig=self.stop_signal)
        finally:
            super().stop()


class NginxPeer(GroupPeer):
    stop_signal = signal.SIGTERM  # fast shutdown; SIGQUIT would wait for open streams

    def __init__(self, primary_url: str, fallback_url: str, settings: Settings, workdir: Path,
                 install: bool = False, practical: bool = False) -> None:
        self.name = "nginx-1s" if practical else "nginx"
        binary = ensure_nginx(install)
        read_timeout = NGINX_PRACTICAL_READ_TIMEOUT * settings.scale if practical else None
        prefix = workdir / self.name
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        (prefix / "nginx.conf").write_text(nginx_conf(settings, primary_url, fallback_url, port, read_timeout))
        self.prefix = prefix
        command = [binary, "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"]
        super().__init__(command, port, prefix, None, "/nginx-probe-404")

    def _wait_ready(self, path: str) -> None:  # any HTTP answer will do: the probe path is proxied
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"nginx exited with {self.process.returncode}:\n{self.output()[-3000:]}\n"
                                      f"{self.error_log()[-3000:]}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=1):
                    return
            time.sleep(0.05)
        raise PeerUnavailable(f"nginx did not listen within {STARTUP_TIMEOUT:.0f} s:\n{self.error_log()[-3000:]}")

    def error_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.prefix / "logs" / "error.log").read_text(errors="replace")
        return ""


class LiteLLMPeer(GroupPeer):
    name = "litellm"

    def __init__(self, primary_url: str, fallback_url: str, settings: Settings, workdir: Path,
                 install: bool = False) -> None:
        executable = ensure_litellm(install)
        config = workdir / "litellm-config.yaml"
        config.write_text(json.dumps(litellm_config(settings, primary_url, fallback_url), indent=2))
        log_config = workdir / "litellm-logging.json"  # no access-log line per request (nginx: access_log off)
        log_config.write_text(json.dumps(LITELLM_LOGGING))
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "LITELLM_"))}
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start-up
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "PYTHONUNBUFFERED": "1",
            "VIRTUAL_ENV": str(LITELLM_VENV),
        })
        env.pop("PYTHONPATH", None)
        command = [str(executable), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                   "--num_workers", "1", "--log_config", str(log_config), "--telemetry", "False"]
        super().__init__(command, port, workdir, env, "/health/liveliness")


def start_peer(name: str, primary_url: str, fallback_url: str, settings: Settings, workdir: str | os.PathLike,
               install: bool = False, confdir: str | os.PathLike | None = None) -> Peer:
    """Start peer `name` (one of PEERS, or "direct") in front of the two simulators; PeerUnavailable if it
    is not installed (and `install` is false or installing fails) or cannot start here."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "direct":
        return DirectPeer(primary_url)
    if name in ("llm-ha", "llm-ha-limits", "llm-ha-resume", "mitmdump"):
        variant = {"llm-ha": "llm-ha", "llm-ha-limits": "limits", "llm-ha-resume": "resume", "mitmdump": None}[name]
        return MitmPeer(primary_url, fallback_url, settings, workdir, variant, confdir=confdir)
    if name in ("nginx", "nginx-1s"):
        return NginxPeer(primary_url, fallback_url, settings, workdir, install, practical=name == "nginx-1s")
    if name == "litellm":
        return LiteLLMPeer(primary_url, fallback_url, settings, workdir, install)
    raise ValueError(f"unknown peer {name!r}; known: direct, {', '.join(PEERS)}")


@atexit.register
def stop_all() -> None:
    """Stop every peer still running (also registered at interpreter exit)."""
    for peer in list(_LIVE):
        with contextlib.suppress(Exception):
            peer.stop()


# -- installing

def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def ensure_nginx(install: bool = False) -> str:
    """The nginx binary; with `install`, installs Debian's package when missing (root with apt-get)."""
    binary = nginx_binary()
    if binary:
        return binary
    how = "apt-get update && apt-get install -y nginx, or make peers"
    if not install:
        raise PeerUnavailable(f"no nginx binary (install: {how})")
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise PeerUnavailable(f"no nginx binary, and apt-get as root is not possible here (install: {how})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("llm-ha bench: installing nginx with apt-get ...", file=sys.stderr, flush=True)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"{' '.join(command)} did not finish in {INSTALL_TIMEOUT:.0f} s") from None
        if result.returncode != 0:
            raise PeerUnavailable(f"{' '.join(command)} failed ({result.returncode}): "
                                  f"{(result.stderr or result.stdout).strip()[-1000:]}")
    binary = nginx_binary()
    if not binary:
        raise PeerUnavailable("apt-get installed nginx but no nginx binary was found")
    return binary


def litellm_stamp() -> Path:
    return LITELLM_VENV / f".installed-litellm-{LITELLM_VERSION}"


def ensure_litellm(install: bool = False) -> Path:
    """The `litellm` executable of LITELLM_VENV; with `install`, creates the venv and installs
    LITELLM_REQUIREMENT when missing (about a minute, ~550 MB). PeerUnavailable if it is not there."""
    executable = LITELLM_VENV / "bin" / "litellm"
    if litellm_stamp().exists() and executable.exists():
        return executable
    if not install:
        raise PeerUnavailable(f"LiteLLM is not installed in {LITELLM_VENV} (install: make peers, or python -m "
                              f"llmbench.peers --install-litellm, or {sys.executable} -m venv {LITELLM_VENV} && "
                              f"{LITELLM_VENV}/bin/pip install '{LITELLM_REQUIREMENT}')")
    LITELLM_VENV.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / f"llm-ha-{LITELLM_VENV.name.lstrip('.')}-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time (parallel test runs, bench + tests)
        if litellm_stamp().exists() and executable.exists():
            return executable
        print(f"llm-ha bench: installing {LITELLM_REQUIREMENT} into {LITELLM_VENV} (about a minute) ...",
              file=sys.stderr, flush=True)
        start = time.monotonic()
        python = LITELLM_VENV / "bin" / "python"
        steps = []
        if not python.exists():
            steps.append([sys.executable, "-m", "venv", str(LITELLM_VENV)])
        steps.append([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      LITELLM_REQUIREMENT])
        for command in steps:
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                                        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)})
            except subprocess.TimeoutExpired:
                raise PeerUnavailable(f"{' '.join(command)} did not finish in {INSTALL_TIMEOUT:.0f} s") from None
            if result.returncode != 0:
                raise PeerUnavailable(f"{' '.join(command)} failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-1500:]}")
        _check_litellm_install()
        seconds = time.monotonic() - start
        litellm_stamp().write_text(json.dumps({"requirement": LITELLM_REQUIREMENT, "seconds": round(seconds, 1),
                                               "date": time.strftime("%Y-%m-%d %H:%M:%S")}))
        print(f"llm-ha bench: LiteLLM installed in {seconds:.0f} s", file=sys.stderr, flush=True)
    if not executable.exists():
        raise PeerUnavailable(f"{LITELLM_REQUIREMENT} installed, but {executable} is missing")
    return executable


def _check_litellm_install() -> None:
    """Refuse an install carrying the .pth start-up hook of the compromised releases."""
    for pth in LITELLM_VENV.glob("lib/python*/site-packages/*.pth"):
        if "litellm" in pth.name.lower():
            raise PeerUnavailable(f"refusing {LITELLM_VENV}: it holds {pth.name}, the start-up hook of the "
                                  f"compromised LiteLLM releases; delete the venv")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmbench.peers", description="Install the peers of bench-peers.")
    parser.add_argument("--install-litellm", action="store_true", help=f"create {LITELLM_VENV} with {LITELLM_REQUIREMENT}")
    parser.add_argument("--install-nginx", action="store_true", help="apt-get install nginx if it is missing")
    args = parser.parse_args(argv)
    failed = False
    for wanted, ensure in ((args.install_nginx, ensure_nginx), (args.install_litellm, ensure_litellm)):
        if not wanted:
            continue
        try:
            print(ensure(install=True))
        except PeerUnavailable as exc:  # say so, and still try the other one
            print(f"llmbench.peers: {exc}", file=sys.stderr)
            failed = True
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
