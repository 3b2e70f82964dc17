# Two entry points for a fresh clone: `make demo` and `make test` (set-up included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m experiments.demo

test: setup
	$(PY) -m pytest -m "not slow"

test-all: setup
	$(PY) -m pytest
