"""Test-only mitmproxy script: llm-ha plus the replay evaluator, as addons/llm_ha.py will have them."""

from llmha.addon import LlmHa
from llmha.replay import ReplayEvaluator

addons = [LlmHa(), ReplayEvaluator()]
