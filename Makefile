# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned to the local CPU build: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptune-installed
TEST_STAMP := $(VENV)/.cliptune-test-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install browser demo test lint docs clean

# Two install levels: the package alone (what `make demo` needs) and the test + tracker extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,track]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/cliptune demo --out $(DEMO_OUT)

# The report tests open the HTML in Debian's chromium through playwright (never `playwright install`).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# A red lint fails the tests (as in CI): lint runs first, then pytest.
test: lint browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

# ruff on all Python; import contracts and strict mypy on the package (settings in pyproject.toml).
# Their caches live in the venv, so `make clean` removes them and git never sees them.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --cache-dir $(VENV)/.import_linter_cache
	$(VENV)/bin/mypy --cache-dir $(VENV)/.mypy_cache

docs: install
	$(VENV)/bin/cliptune config docs --out docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
