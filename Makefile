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

# open_clip and timm (the open_clip extra) require torchvision, whose PyPI build fails to import beside the
# CPU torch and would make transformers believe it is usable: installed with --no-deps (their other
# dependencies come with the package and the test extra); cliptune imports them under a stand-in torchvision.
OPEN_CLIP_PKGS := open_clip_torch==3.3.0 timm==1.0.31

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,track]"
	$(PY) -m pip install --quiet --no-deps $(OPEN_CLIP_PKGS)
	touch $(TEST_STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/cliptune demo --out $(DEMO_OUT)

# The report tests open the HTML in Debian's chromium through playwright (never `playwright install`).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# A red lint fails the tests (as in CI): lint runs first, then pytest. CLIPTUNE_REQUIRE_OPEN_CLIP turns a
# missing open_clip into a failure instead of a skip, so the open_clip parity tests always run here.
test: lint browser
	CLIPTUNE_REQUIRE_OPEN_CLIP=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

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
