# Two commands on a fresh clone: `make demo` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench sysdeps clean web

# The explorer's built front end (shipped in the wheel; users need no Node). Rebuilt when
# missing or older than any source of it.
STATIC := src/lurker/server/static/index.html
WEB_SRC := $(shell find web/src -type f 2>/dev/null) web/index.html web/package.json \
	web/package-lock.json web/vite.config.ts web/tsconfig.json

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	# oracles the tests import without their declared requirements: lxt's AttnLRP rules
	# (tests/test_explain_lrp.py: lxt.explicit.functional, plain torch; not transformers,
	# bitsandbytes, ...) and Lucent's image parameterization and objectives
	# (tests/test_featviz_lucent.py: lucent.optvis.param and objectives, torch and decorator)
	$(PY) -m pip install -q --no-deps lxt==2.1 torch-lucent==0.1.8 decorator
	touch $@

$(STATIC): $(WEB_SRC)
	@command -v npm >/dev/null || { echo "building the explorer (web/) needs Node 20+ and npm" >&2; exit 1; }
	cd web && npm ci --prefer-offline --no-audit --no-fund && npm run build
	touch $@

web: $(STATIC)

# Debian's graphviz provides `dot`, which draws the graphs; its chromium runs the browser
# tests (Playwright drives /usr/bin/chromium; no browser download).
sysdeps:
	@command -v dot >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q graphviz; }
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

demo: $(VENV)/.installed sysdeps $(STATIC)
	$(PY) -m lurker.demo --out demo-out

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(VENV)/.installed sysdeps $(STATIC) lint
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/trace_overhead.py
	$(PY) benchmarks/probe_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache build web/node_modules src/lurker/server/static
