"""Profiles: the YAML that says which flows are LLM flows, where they may go, and how health is judged.

`load_profile` turns a file into a typed, validated `Profile`, or raises `ProfileError`, whose text is
one line naming the file, the key and the problem. Pure apart from reading the file: the environment
(for `${VAR}`) and the reverse-proxy target (for upstreams without nodes) are passed in.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from .splice import APIS

DEFAULT_MATCH = '~u "/v1/|/api/(chat|generate|embed)"'  # OpenAI-style APIs and Ollama's native ones


class ProfileError(ValueError):
    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class HealthCheck:
    failure_rate_threshold: float = 50.0
    interval: float = 1.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    min_requests: int = 1
    k_decay_after: float | None = None  # None: base_ejection_time

    @property
    def k_decay_period(self) -> float:
        return self.base_ejection_time if self.k_decay_after is None else self.k_decay_after


@dataclass(frozen=True)
class RetryBudgetSettings:
    percent: float = 20.0  # retries on an upstream, as a percentage of its requests over the window
    min_per_s: float = 1.0  # a floor of retries a second, so that a quiet upstream may still retry
    window: float = 10.0


@dataclass(frozen=True)
class ProbeSettings:
    enabled: bool = True
    method: str = "GET"
    path: str = "/v1/models"
    body: str | None = None
    interval: float = 1.0
    timeout: float = 2.0
    early_return_after: int = 0  # > 0: this many passes in a row end an ejection early (off by default)


@dataclass(frozen=True)
class Upstream:
    name: str
    nodes: tuple[str, ...]
    api_key: str | None = None
    model: str | None = None
    first_byte_timeout: float = 0.2
    request_timeout: float = 600.0
    stream_idle_timeout: float = 20.0
    resume: str = "off"  # how this upstream may continue an answer broken elsewhere (core/splice.py)
    auth: str = "bearer"  # how `api_key` is sent: AUTH_MODES
    protocols: tuple[str, ...] = ("openai",)  # the APIs it speaks (core/splice.py APIS); failover stays within one
    max_inflight: int | None = None
    adaptive: bool = False
    min_inflight: int = 1
    slow_start: float = 0.0
    request_deadline: float | None = None  # total time on one request's attempts before its first byte
    failover_on: tuple[str, ...] = ()  # 4xx error codes (or types) that move the request to the next upstream
    max_attempts: int = 3  # attempts one request may make on this upstream's nodes
    health_scope: str = "node"  # HEALTH_SCOPES: what one health entry covers, the node or a model on it
    hedge_after: float | None = None  # no first token by then: the next candidate starts too (None: off)


@dataclass(frozen=True)
class Profile:
    path: str
    upstreams: tuple[Upstream, ...]
    match: str = DEFAULT_MATCH
    match_given: bool = False  # `match` written in the profile (else DEFAULT_MATCH, kept to the primary's hosts)
    health_check: HealthCheck = field(default_factory=HealthCheck)
    transparent_failover: bool = True
    shared_state: str | None = field(default=None, repr=False)  # a Redis URL; may hold a password
    retry_after_max: float = 2.0  # longest wait for a `Retry-After` when no other candidate is left
    retry_budget: RetryBudgetSettings = field(default_factory=RetryBudgetSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)

    @functools.cached_property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def first_byte_timeout(self) -> float:
        return self.upstreams[0].first_byte_timeout


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_TOP_KEYS = {"match", "first_byte_timeout", "request_timeout", "stream_idle_timeout", "health_check", "upstreams",
             "transparent_failover", "shared_state", "request_deadline", "retry_after_max", "retry_budget",
             "max_attempts_per_upstream", "probe", "hedge_after"}
_HEALTH_KEYS = {f for f in HealthCheck.__dataclass_fields__}
_UPSTREAM_KEYS = {"name", "nodes", "api_key", "model", "first_byte_timeout", "request_timeout", "max_inflight",
                  "adaptive", "min_inflight", "slow_start", "stream_idle_timeout", "resume", "request_deadline",
                  "failover_on", "max_attempts_per_upstream", "auth", "protocols", "hedge_after",
                  "health_scope"}
RESUME_MODES = ("off", "prefill", "prefill-vllm", "prefill-deepseek")
AUTH_MODES = ("bearer", "x-api-key", "api-key")
HEALTH_SCOPES = ("node", "model")  # node: one unit (a self-hosted server); model: per (node, model) (a hosted API)


SHARED_STATE_SCHEMES = ("redis", "rediss", "unix")


def masked_url(url: str) -> str:
    """`url` with its password (in the user part or a `password=` query parameter) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


def parse_duration(value: Any) -> float:
    """'200ms', '1s', '2m', '1h' or a number of seconds -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(value)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(value)
    return seconds


def load_profile(path: str | os.PathLike, env: Mapping[str, str] | None = None,
                 reverse_target: str | None = None) -> Profile:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(path, "", f"cannot read the profile: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ProfileError(path, "", f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_profile(data, path, os.environ if env is None else env, reverse_target)


def parse_profile(data: Any, path: str, env: Mapping[str, str], reverse_target: str | None) -> Profile:
    reader = _Reader(path, env)
    top = reader.mapping(data, "", _TOP_KEYS)
    defaults = {
        "first_byte_timeout": reader.duration(top, "first_byte_timeout", 0.2),
        "request_timeout": reader.duration(top, "request_timeout", 600.0),
        "stream_idle_timeout": reader.duration(top, "stream_idle_timeout", 20.0),
        "request_deadline": reader.optional_duration(top, "request_deadline", None),
        "max_attempts_per_upstream": reader.positive_int(top, "max_attempts_per_upstream", "") or 3,
        "hedge_after": reader.optional_duration(top, "hedge_after", None),
    }
    upstream_list = top.get("upstreams")
    if not isinstance(upstream_list, list) or not upstream_list:
        raise ProfileError(path, "upstreams", "needs a list of at least one upstream")
    upstreams = tuple(
        reader.upstream(item, f"upstreams[{i}]", defaults, reverse_target if i == 0 else None)
        for i, item in enumerate(upstream_list)
    )
    names = [u.name for u in upstreams]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ProfileError(path, f"upstreams[{i}].name", f"duplicate upstream name {name!r}")
    match = top.get("match", DEFAULT_MATCH)
    if not isinstance(match, str) or not match.strip():
        raise ProfileError(path, "match", "needs a mitmproxy filter expression, e.g. '~u /v1/'")
    failover = top.get("transparent_failover", True)
    if not isinstance(failover, bool):
        raise ProfileError(path, "transparent_failover", f"needs true or false, got {failover!r}")
    return Profile(path=path, upstreams=upstreams, match=match, match_given="match" in top,
                   health_check=reader.health_check(top.get("health_check", {})),
                   transparent_failover=failover, shared_state=reader.shared_state(top),
                   retry_after_max=reader.duration(top, "retry_after_max", 2.0, allow_zero=True),
                   retry_budget=reader.retry_budget(top.get("retry_budget")), probe=reader.probe(top.get("probe")))


class _Reader:
    """Reads one profile, keeping the file name for its errors."""

    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path, self.env = path, env

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(self.path, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"needs a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                raise self.fail(where, f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def duration(self, section: dict, name: str, default: float, prefix: str = "", allow_zero: bool = False) -> float:
        if name not in section:
            return default
        if allow_zero and section[name] in (0, "0", "0s", "0ms"):
            return 0.0
        try:
            return parse_duration(section[name])
        except ValueError:
            raise self.fail(prefix + name, f"bad duration {section[name]!r} (use e.g. 200ms, 1s, 30s, "
                                           "or a positive number of seconds)") from None

    def optional_duration(self, section: dict, name: str, default: float | None, prefix: str = "") -> float | None:
        return self.duration(section, name, 0.0, prefix) if name in section else default

    def health_check(self, value: Any) -> HealthCheck:
        section = self.mapping(value, "health_check", _HEALTH_KEYS)
        prefix = "health_check."
        threshold = section.get("failure_rate_threshold", 50)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 1 <= threshold <= 100:
            raise self.fail(prefix + "failure_rate_threshold", f"needs a percentage from 1 to 100, got {threshold!r}")
        min_requests = section.get("min_requests", 1)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
            raise self.fail(prefix + "min_requests", f"needs a whole number >= 1, got {min_requests!r}")
        base = self.duration(section, "base_ejection_time", 30.0, prefix)
        cap = self.duration(section, "max_ejection_time", max(300.0, base), prefix)
        if cap < base:
            raise self.fail(prefix + "max_ejection_time", f"{cap:g}s is shorter than base_ejection_time {base:g}s")
        decay = self.duration(section, "k_decay_after", base, prefix) if "k_decay_after" in section else None
        return HealthCheck(failure_rate_threshold=float(threshold),
                           interval=self.duration(section, "interval", 1.0, prefix),
                           base_ejection_time=base, max_ejection_time=cap,
                           min_requests=min_requests, k_decay_after=decay)

    def upstream(self, value: Any, key: str, defaults: dict, reverse_target: str | None) -> Upstream:
        section = self.mapping(value, key, _UPSTREAM_KEYS)
        name = section.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.fail(f"{key}.name", "needs a non-empty name")
        return Upstream(
            name=name,
            nodes=self.nodes(section, key, reverse_target),
            api_key=self.secret(section, "api_key", key),
            model=self.text(section, "model", key),
            first_byte_timeout=self.duration(section, "first_byte_timeout", defaults["first_byte_timeout"], key + "."),
            request_timeout=self.duration(section, "request_timeout", defaults["request_timeout"], key + "."),
            stream_idle_timeout=self.duration(section, "stream_idle_timeout", defaults["stream_idle_timeout"],
                                              key + "."),
            resume=self.choice(section, "resume", RESUME_MODES, key),
            request_deadline=self.optional_duration(section, "request_deadline", defaults["request_deadline"],
                                                    key + "."),
            failover_on=self.codes(section, "failover_on", key),
            max_attempts=(self.positive_int(section, "max_attempts_per_upstream", key)
                          or defaults["max_attempts_per_upstream"]),
            auth=self.choice(section, "auth", AUTH_MODES, key),
            protocols=self.protocols(section, key),
            health_scope=self.choice(section, "health_scope", HEALTH_SCOPES, key),
            hedge_after=self.hedge_after(section, key, defaults),
            **self.limits(section, key),
        )

    def hedge_after(self, section: dict, key: str, defaults: dict) -> float | None:
        """Shorter than the upstream's first-byte timeout, or it would never fire."""
        value = self.optional_duration(section, "hedge_after", defaults["hedge_after"], key + ".")
        timeout = self.duration(section, "first_byte_timeout", defaults["first_byte_timeout"], key + ".")
        if value is not None and value >= timeout:
            where = f"{key}.hedge_after" if "hedge_after" in section else "hedge_after"
            raise self.fail(where, f"{value:g}s is not shorter than {key}'s first_byte_timeout {timeout:g}s: "
                                   "it would never fire")
        return value

    def codes(self, section: dict, name: str, key: str) -> tuple[str, ...]:
        value = section.get(name, [])
        if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
            raise self.fail(f"{key}.{name}", f"needs a list of error codes, e.g. [context_length_exceeded], got {value!r}")
        return tuple(value)

    def retry_budget(self, value: Any) -> RetryBudgetSettings:
        section = self.mapping(value, "retry_budget", {"percent", "min_per_s", "window"})
        percent = section.get("percent", 20)
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise self.fail("retry_budget.percent", f"needs a percentage from 0 to 100, got {percent!r}")
        floor = section.get("min_per_s", 1)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor < 0:
            raise self.fail("retry_budget.min_per_s", f"needs a number >= 0, got {floor!r}")
        return RetryBudgetSettings(percent=float(percent), min_per_s=float(floor),
                                   window=self.duration(section, "window", 10.0, "retry_budget."))

    def probe(self, value: Any) -> ProbeSettings:
        if value is False:
            return ProbeSettings(enabled=False)
        section = self.mapping(value, "probe", {f for f in ProbeSettings.__dataclass_fields__})
        enabled = section.get("enabled", True)
        if not isinstance(enabled, bool):
            raise self.fail("probe.enabled", f"needs true or false, got {enabled!r}")
        method = section.get("method", "GET")
        if not isinstance(method, str) or not method.isalpha():
            raise self.fail("probe.method", f"needs an HTTP method such as GET, got {method!r}")
        path = section.get("path", "/v1/models")
        if not isinstance(path, str) or not path.startswith("/"):
            raise self.fail("probe.path", f"needs a path starting with /, got {path!r}")
        body = section.get("body")
        if body is not None and not isinstance(body, (str, dict, list)):
            raise self.fail("probe.body", f"needs a string or a JSON object, got {type(body).__name__}")
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        early = section.get("early_return_after", 0)
        if isinstance(early, bool) or not isinstance(early, int) or early < 0:
            raise self.fail("probe.early_return_after", f"needs a whole number >= 0 (0: off), got {early!r}")
        return ProbeSettings(enabled=enabled, method=method.upper(), path=path, body=body,
                             interval=self.duration(section, "interval", 1.0, "probe."),
                             timeout=self.duration(section, "timeout", 2.0, "probe."), early_return_after=early)

    def protocols(self, section: dict, key: str) -> tuple[str, ...]:
        value = section.get("protocols", ["openai"])
        if not isinstance(value, list) or not value or any(p not in APIS for p in value):
            raise self.fail(f"{key}.protocols", f"needs a list of {', '.join(APIS)}, got {value!r}")
        return tuple(dict.fromkeys(value))

    def limits(self, section: dict, key: str) -> dict:
        max_inflight = self.positive_int(section, "max_inflight", key)
        min_inflight = self.positive_int(section, "min_inflight", key) or 1
        adaptive = section.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise self.fail(f"{key}.adaptive", f"needs true or false, got {adaptive!r}")
        slow_start = self.duration(section, "slow_start", 0.0, key + ".") if "slow_start" in section else 0.0
        for name, wanted in (("adaptive", adaptive), ("slow_start", slow_start), ("min_inflight", "min_inflight" in section)):
            if wanted and max_inflight is None:
                raise self.fail(f"{key}.{name}", "needs max_inflight, the upper bound of the limit")
        if max_inflight is not None and min_inflight > max_inflight:
            raise self.fail(f"{key}.min_inflight", f"{min_inflight} is above max_inflight {max_inflight}")
        return {"max_inflight": max_inflight, "min_inflight": min_inflight, "adaptive": adaptive,
                "slow_start": slow_start}

    def nodes(self, section: dict, key: str, reverse_target: str | None) -> tuple[str, ...]:
        if "nodes" not in section:
            if reverse_target:
                return (reverse_target.rstrip("/"),)
            raise self.fail(f"{key}.nodes", "missing (only the first upstream may omit nodes, "
                                            "and only in reverse-proxy mode, where it means the reverse target)")
        nodes = section["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise self.fail(f"{key}.nodes", "needs a list of base URLs, e.g. [\"http://127.0.0.1:8001\"]")
        urls: list[str] = []
        for i, node in enumerate(nodes):
            url = self.expand(node, f"{key}.nodes[{i}]").rstrip("/") if isinstance(node, str) else ""
            parts = urlsplit(url) if url else None
            if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
                raise self.fail(f"{key}.nodes[{i}]", f"needs an http:// or https:// base URL, got {node!r}")
            urls.append(url)
        if len(set(urls)) != len(urls):
            raise self.fail(f"{key}.nodes", "lists the same URL twice")
        return tuple(urls)

    def text(self, section: dict, name: str, key: str, secret: bool = False) -> str | None:
        value = section.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            shown = f"a {type(value).__name__}" if secret else repr(value)
            raise self.fail(f"{key}.{name}", f"needs a non-empty string, got {shown}")
        return self.expand(value, f"{key}.{name}")

    def secret(self, section: dict, name: str, key: str) -> str | None:
        value = self.text(section, name, key, secret=True)
        if value is not None and any(c in value for c in "\r\n"):
            raise self.fail(f"{key}.{name}", "contains a line break")
        return value

    def choice(self, section: dict, name: str, allowed: tuple[str, ...], key: str) -> str:
        value = section.get(name, allowed[0])
        if value is False and "off" in allowed:  # YAML reads a bare `off` as false
            value = "off"
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(f"{key}.{name}", f"needs one of {', '.join(allowed)}, got {value!r}")
        return value

    def shared_state(self, top: dict) -> str | None:
        """The Redis URL that instances of this profile share their state through; errors never show its password."""
        value = top.get("shared_state")
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail("shared_state", f"needs a URL such as redis://HOST:PORT/DB, got {type(value).__name__}")
        url = self.expand(value.strip(), "shared_state")
        parts: SplitResult | None = urlsplit(url)
        try:
            urlsplit(url).port  # noqa: B018 - raises on a bad port
        except ValueError:
            parts = None
        where = parts and (parts.path if parts.scheme == "unix" else parts.hostname)
        if not parts or parts.scheme not in SHARED_STATE_SCHEMES or not where:
            raise self.fail("shared_state", f"needs a redis://, rediss:// or unix:// URL, e.g. "
                                            f"redis://127.0.0.1:6379/0, got {masked_url(url)!r}")
        db = parts.path.strip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise self.fail("shared_state", f"the database after the host must be a number, got {masked_url(url)!r}")
        return url

    def positive_int(self, section: dict, name: str, key: str) -> int | None:
        value = section.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"{key}.{name}" if key else name, f"needs a whole number >= 1, got {value!r}")
        return value

    def expand(self, value: str, key: str) -> str:
        def lookup(match: re.Match) -> str:
            var = match.group(1)
            if var not in self.env or self.env[var] == "":
                raise self.fail(key, f"environment variable {var} is not set")
            return self.env[var]

        return _ENV_REF.sub(lookup, value)
