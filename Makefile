# Set-up and everyday targets. `make serve` and `make test` work on a fresh machine: they create
# .venv, install the CPU torch wheel (pinned: an open range pulls CUDA builds), then the project.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PROMPT ?= Once upon a time

.PHONY: serve demo test proto proto-check bench install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/moefleet serve

demo: $(STAMP)
	$(VENV)/bin/moefleet generate "$(PROMPT)"

test: $(STAMP) proto-check
	RAY_AUTH_MODE=disabled $(VENV)/bin/python -m pytest -q tests

# Generated gRPC code is checked in (moefleet/v1); regenerate it after editing proto/.
proto: $(STAMP)
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/moefleet/v1/*.proto

# Fails when the checked-in code differs from what the .proto files generate.
proto-check: $(STAMP)
	rm -rf .proto-check && mkdir -p .proto-check
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=.proto-check --grpc_python_out=.proto-check --pyi_out=.proto-check proto/moefleet/v1/*.proto
	diff -r -x __init__.py -x __pycache__ .proto-check/moefleet/v1 moefleet/v1 || { echo "moefleet/v1 is stale: run 'make proto'"; exit 1; }
	rm -rf .proto-check

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/engine_throughput.py
	$(VENV)/bin/python benchmarks/engine_throughput.py --dtype bfloat16
	$(VENV)/bin/python benchmarks/distributed_overhead.py
	$(VENV)/bin/python benchmarks/gateway.py
	$(VENV)/bin/python benchmarks/elasticity.py
	$(VENV)/bin/python benchmarks/planner_moves.py
	$(VENV)/bin/python benchmarks/output_channel.py
	$(VENV)/bin/python benchmarks/detokenizer.py
	$(VENV)/bin/python benchmarks/serving.py

.PHONY: helm-schema helm-docs

# The Helm chart's values.schema.json, generated from moefleet/helm_values.py (a test fails when stale).
helm-schema: $(STAMP)
	$(VENV)/bin/python -m moefleet.helm_values

# The values table of helm/README.md, generated from values.yaml's helm-docs comments.
helm-docs: $(STAMP)
	$(VENV)/bin/python -m moefleet.helm_docs
