# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned to the local CPU build: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptune-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install browser demo test lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/cliptune demo --out $(DEMO_OUT)

# The report tests open the HTML in Debian's chromium through playwright (never `playwright install`).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

docs: install
	$(VENV)/bin/cliptune config docs --out docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
