"""The traffic-spike scenario, the demo and the benchmarks of llm-ha, run against `llmsim` simulators."""
