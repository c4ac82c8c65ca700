# Two commands on a fresh clone: `make demo` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench sysdeps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian's graphviz provides `dot`, which draws the graphs.
sysdeps:
	@command -v dot >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q graphviz; }

demo: $(VENV)/.installed sysdeps
	$(PY) -m lurker.demo --out demo-out

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(VENV)/.installed sysdeps lint
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/trace_overhead.py
	$(PY) benchmarks/probe_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache build
