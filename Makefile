# Quick start: `make demo` and `make test`; both run the idempotent `make setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test setup-bench demo test test-k8s lint typecheck unit fuzz bench bench-nginx protos clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/qtrace demo

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

# tests/k8s/ needs a real cluster: `make test-k8s` runs it.
unit:
	$(VENV)/bin/pytest -q --ignore=tests/k8s

# The hostile-input properties run far longer than in CI (about 200 times the examples).
fuzz:
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_hostile.py -k "not markup"

setup-test:
	bash scripts/setup.sh --test

test: setup-test lint typecheck unit

# A real two-node Kubernetes cluster on this machine (scripts/k8s/README.md): built once,
# brought up, tested, and torn down even on failure.
test-k8s: setup-test
	bash scripts/k8s/test.sh

# The benchmarks also need nginx and wrk (bench/nginx_overhead.py): `--bench` installs them.
setup-bench:
	bash scripts/setup.sh --bench

bench: setup-bench
	$(PY) bench/trace_overhead.py
	$(PY) bench/trace_overhead.py --probes all
	$(PY) bench/recorder_recovery.py --history-size 256M
	$(PY) bench/node_overhead.py
	$(PY) bench/ingest_grpc.py
	$(PY) bench/ingest_store.py
	$(PY) bench/replay_throughput.py
	$(PY) bench/explain_accuracy.py
	$(PY) bench/nginx_overhead.py
	$(PY) bench/pipeline_rate.py

# The worst case: a static file from nginx over loopback, untraced vs traced.
bench-nginx: setup-bench
	$(PY) bench/nginx_overhead.py

# Regenerates qtrace/api/ from protos/ (tests fail when the committed code is stale).
protos:
	bash scripts/gen_protos.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
