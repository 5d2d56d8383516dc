# The two commands README gives. Both set everything up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	# redis-server for the control-plane store tests (Debian package; we run as root).
	command -v redis-server >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null)
	# libibverbs1: the Mooncake wheel (the kvpool extra) links it, TCP included.
	ldconfig -p | grep -q 'libibverbs\.so\.1 ' || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libibverbs1 >/dev/null)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, pinned before anything that depends on it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,nixl,ray,kvpool]'
	touch $(STAMP)

# The whole cluster on this machine: local Ray, embedded control plane, the tiny model,
# 1 prefill + 1 decode worker, the OpenAI gateway on 127.0.0.1:8000. Ctrl-C stops it.
run: setup
	$(VENV)/bin/pdserve up

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_engine.py
