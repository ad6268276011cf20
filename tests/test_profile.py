"""Profile parsing: typed values, and one clear line for every class of mistake."""

from pathlib import Path

import pytest

from llmha.core.profile import ProfileError, load_profile, parse_duration

PROFILES = Path(__file__).parent.parent / "profiles"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


MINIMAL = """
upstreams:
  - name: primary
    nodes: ["http://127.0.0.1:8001"]
"""


@pytest.mark.parametrize("value,seconds", [("200ms", 0.2), ("1s", 1.0), ("30s", 30.0), ("2m", 120.0),
                                           (5, 5.0), (0.25, 0.25), ("1.5s", 1.5)])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["fast", "-1s", "0", 0, "1 day", True, None, "10 ms s"])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_minimal_profile_gets_the_reference_defaults(tmp_path):
    profile = load_profile(write(tmp_path, MINIMAL), env={})
    hc = profile.health_check
    assert (hc.failure_rate_threshold, hc.interval, hc.base_ejection_time, hc.max_ejection_time) == (50, 1, 30, 300)
    assert hc.min_requests == 1 and hc.k_decay_period == 30
    assert profile.match == '~u "/v1/|/api/(chat|generate|embed)"'
    assert profile.upstreams[0].first_byte_timeout == 0.2
    assert profile.upstreams[0].request_timeout == 600
    assert profile.transparent_failover is True
    assert profile.name == "p"


def test_per_upstream_override_env_and_reverse_target(tmp_path):
    path = write(tmp_path, """
first_byte_timeout: 300ms
health_check: {k_decay_after: 10s}
upstreams:
  - name: primary
    api_key: "${PKEY}"
  - name: fallback
    nodes: ["${FALLBACK_URL}/"]
    model: qwen-plus
    first_byte_timeout: 5s
""")
    profile = load_profile(path, env={"PKEY": "secret-1", "FALLBACK_URL": "https://example.test/compat"},
                           reverse_target="http://127.0.0.1:8001")
    primary, fallback = profile.upstreams
    assert primary.nodes == ("http://127.0.0.1:8001",) and primary.api_key == "secret-1"
    assert primary.first_byte_timeout == pytest.approx(0.3)
    assert fallback.nodes == ("https://example.test/compat",) and fallback.model == "qwen-plus"
    assert fallback.first_byte_timeout == 5
    assert profile.health_check.k_decay_period == 10


@pytest.mark.parametrize("text,key,problem", [
    ("upstreams: []", "upstreams", "at least one upstream"),
    ("match: '~u /v1/'", "upstreams", "at least one upstream"),
    (MINIMAL + "colour: blue\n", "colour", "unknown key"),
    (MINIMAL + "health_check: {treshold: 50}\n", "health_check.treshold", "unknown key"),
    (MINIMAL + "first_byte_timeout: soon\n", "first_byte_timeout", "bad duration 'soon'"),
    (MINIMAL + "health_check: {interval: 0}\n", "health_check.interval", "bad duration"),
    (MINIMAL + "health_check: {failure_rate_threshold: 0}\n", "health_check.failure_rate_threshold", "1 to 100"),
    (MINIMAL + "health_check: {failure_rate_threshold: 150}\n", "health_check.failure_rate_threshold", "1 to 100"),
    (MINIMAL + "health_check: {min_requests: 0}\n", "health_check.min_requests", "whole number"),
    (MINIMAL + "health_check: {base_ejection_time: 60s, max_ejection_time: 30s}\n",
     "health_check.max_ejection_time", "shorter than base_ejection_time"),
    ("upstreams:\n  - name: p\n    api_key: '${NOT_SET_ANYWHERE}'\n    nodes: ['http://127.0.0.1:1']\n",
     "upstreams[0].api_key", "environment variable NOT_SET_ANYWHERE is not set"),
    ("upstreams:\n  - name: p\n    nodes: ['ftp://x']\n", "upstreams[0].nodes[0]", "http:// or https://"),
    ("upstreams:\n  - nodes: ['http://127.0.0.1:1']\n", "upstreams[0].name", "non-empty name"),
    ("upstreams:\n  - name: p\n", "upstreams[0].nodes", "reverse-proxy mode"),
    (MINIMAL + "  - name: primary\n    nodes: ['http://127.0.0.1:2']\n", "upstreams[1].name", "duplicate"),
    (MINIMAL + "transparent_failover: maybe\n", "transparent_failover", "true or false"),
    ("upstreams: [\n", "", "not valid YAML"),
])
def test_each_mistake_is_one_line_naming_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path, env={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert f": {key}: " in message if key else True
    assert problem in message


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "nope.yaml")


def test_a_bad_api_key_is_not_echoed(tmp_path):
    path = write(tmp_path, "upstreams:\n  - name: p\n    nodes: ['http://127.0.0.1:1']\n    api_key: 123456789\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(path, env={})
    assert "123456789" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(p.name for p in PROFILES.glob("*.yaml")))
def test_shipped_profiles_load_and_say_when_to_use_them(name):
    env = {"PAI_EAS_URL": "https://eas.example.test/api/predict/x", "PAI_EAS_TOKEN": "t",
           "DASHSCOPE_API_KEY": "d", "OPENAI_API_KEY": "o"}
    text = (PROFILES / name).read_text()
    assert text.startswith(f"# {name.removesuffix('.yaml')}:"), "each profile opens with a comment header"
    profile = load_profile(PROFILES / name, env=env, reverse_target="http://127.0.0.1:8001")
    assert len(profile.upstreams) >= 2


def test_the_source_documents_profile_has_its_reference_values():
    env = {"PAI_EAS_URL": "https://eas.example.test", "PAI_EAS_TOKEN": "t", "DASHSCOPE_API_KEY": "d"}
    profile = load_profile(PROFILES / "pai-eas-to-bailian.yaml", env=env)
    hc = profile.health_check
    assert (hc.failure_rate_threshold, hc.interval, hc.base_ejection_time) == (50, 1, 30)
    assert profile.upstreams[0].first_byte_timeout == pytest.approx(0.2)
    assert profile.upstreams[1].model == "qwen-plus"
