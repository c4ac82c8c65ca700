# Two commands on a fresh clone: `make demo` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench sysdeps clean build

# The per-op hot path is compiled with Cython beside its .py files (setup.py); the
# install builds it, and $(BUILT) rebuilds it whenever one of those files changes. Without
# a C compiler lurker runs the .py files as they are (tracing is then slower).
COMPILED_SRC := $(wildcard $(foreach m,capture/_funcs capture/_recorder capture/_tree graph/nodes graph/postprocess,src/lurker/$(m).py src/lurker/$(m).pxd))
BUILT := $(VENV)/.built

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	LURKER_NO_COMPILE=1 $(PY) -m pip install -q -e '.[dev]'
	touch $@

$(BUILT): $(VENV)/.installed $(COMPILED_SRC)
	$(PY) setup.py -q build_ext --inplace || echo "lurker: compiling failed; the .py files run instead"
	touch $@

build: $(BUILT)

# Debian's graphviz provides `dot`, which draws the graphs.
sysdeps:
	@command -v dot >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q graphviz; }

demo: $(BUILT) sysdeps
	$(PY) -m lurker.demo --out demo-out

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks setup.py
	$(VENV)/bin/ruff format --check src tests benchmarks setup.py

test: $(BUILT) sysdeps lint
	$(PY) -m pytest -n 2 -q tests
	@echo "The tracing tests again, on the pure-Python hot path (what runs without a compiler):"
	LURKER_PURE_PYTHON=1 $(PY) -m pytest -n 2 -q tests/test_trace.py tests/test_models.py tests/test_schema.py

bench: $(BUILT)
	$(PY) benchmarks/trace_overhead.py
	$(PY) benchmarks/probe_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache build
	find src -name '*.so' -delete -o -name '*.c' -delete
