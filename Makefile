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
	$(PY) -m llmsim.demo

bench-overhead: $(STAMP)
	$(PY) -m llmsim.bench_overhead

bench-spike: $(STAMP)
	$(PY) -m llmsim.bench_spike

# The gateways bench-peers compares with: nginx (Debian's package, needs root) and the LiteLLM proxy in
# its own .venv-litellm. The smoke test installs them on demand too, or skips with the reason.
peers: $(STAMP)
	$(PY) -m llmsim.peers --install-nginx --install-litellm

bench-peers: peers
	$(PY) -m llmsim.bench_peers

clean:
	rm -rf $(VENV) .venv-litellm .pytest_cache build *.egg-info addons/*.egg-info sim/*.egg-info
