# llm-ha: `make demo` and `make test` work from a clean clone (they create .venv when missing).
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint peers bench-overhead bench-soak bench-probe bench-spike bench-budget bench-peers demo-cluster bench-cluster clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys; assert sys.version_info >= (3, 12), "llm-ha needs Python 3.12+, got " + sys.version'
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

test: lint
	$(PY) -m pytest -q

# ruff over the tree; mypy over the pure core (addons/llmha/core); both configured in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m llmbench.demo

# Interleaved rounds of direct / bare mitmdump / mitmdump + llm-ha, about 13 minutes; BENCH_ARGS=--quick for a
# smoke run, BENCH_ARGS="--only sweep" for one part (python -m llmbench.bench_overhead --help).
bench-overhead: $(STAMP)
	$(PY) -m llmbench.bench_overhead $(BENCH_ARGS)

# 10,000 streamed requests, 100 at a time, through llm-ha: mitmdump's RSS and fds every 10 s.
bench-soak: $(STAMP)
	$(PY) -m llmbench.bench_soak $(BENCH_ARGS)

# A primary that dies and stays down, with and without probing (about 1.5 minutes).
bench-probe: $(STAMP)
	$(PY) -m llmbench.bench_probe $(BENCH_ARGS)

bench-spike: $(STAMP)
	$(PY) -m llmbench.bench_spike

# The retry budget on and off, and hedging, on the spike: A, a two-node primary ejected at the document's
# settings; B, a four-node primary kept in rotation (about 8 minutes; BENCH_ARGS="--scenario eject" for A).
bench-budget: $(STAMP)
	$(PY) -m llmbench.bench_budget $(BENCH_ARGS)

# The gateways bench-peers compares with: nginx (Debian's package, needs root) and the LiteLLM proxy in
# its own .venv-litellm. The tests never install them: without them the peers' smoke test skips.
peers: $(STAMP)
	$(PY) -m llmbench.peers --install-nginx --install-litellm

bench-peers: peers
	$(PY) -m llmbench.bench_peers

# Several instances sharing state through Redis behind nginx round-robin (Debian's redis-server and nginx).
demo-cluster: $(STAMP)
	$(PY) -m llmbench.cluster

bench-cluster: $(STAMP)
	$(PY) -m llmbench.bench_cluster

clean:
	rm -rf $(VENV) .venv-litellm .pytest_cache build *.egg-info addons/*.egg-info sim/*.egg-info bench/*.egg-info
