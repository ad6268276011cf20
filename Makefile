# llm-ha: `make demo` and `make test` work from a clean clone (they create .venv when missing).
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test peers bench-overhead bench-spike bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys; assert sys.version_info >= (3, 12), "llm-ha needs Python 3.12+, got " + sys.version'
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m llmbench.demo

bench-overhead: $(STAMP)
	$(PY) -m llmbench.bench_overhead

bench-spike: $(STAMP)
	$(PY) -m llmbench.bench_spike

# The gateways bench-peers compares with: nginx (Debian's package, needs root) and the LiteLLM proxy in
# its own .venv-litellm. The tests never install them: without them the peers' smoke test skips.
peers: $(STAMP)
	$(PY) -m llmbench.peers --install-nginx --install-litellm

bench-peers: peers
	$(PY) -m llmbench.bench_peers

clean:
	rm -rf $(VENV) .venv-litellm .pytest_cache build *.egg-info addons/*.egg-info sim/*.egg-info bench/*.egg-info
