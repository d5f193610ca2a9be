# Set-up and everyday targets. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the CPU torch wheel (pinned: an open range pulls CUDA builds), then the project.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PROMPT ?= Once upon a time

.PHONY: demo test bench install clean-models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moefleet generate "$(PROMPT)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/engine_throughput.py
