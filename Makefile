# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned to the local CPU build: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptune-installed
TEST_STAMP := $(VENV)/.cliptune-test-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install browser demo test lint docs clean mutation

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

# Mutation testing (docs/reliability.md, "Mutation testing"): run by hand, never by `make test`. Each entry is
# NAME:FILES:TESTS[:MUTANTS] (FILES under src/cliptune, globs allowed; TESTS the fast test files that cover
# them; MUTANTS, optional, mutmut's names of the functions to mutate, fnmatch patterns: FILES mutated but only
# those functions' mutants run, as `identity` does for the identity functions of two larger modules). Each
# name runs mutmut in its own scratch copy under $(MUTATION_DIR)/NAME with only its files mutated and only
# its tests run, the two lines of [tool.mutmut] in pyproject.toml replaced there; docs/ is copied along
# (`also_copy`): some tests read it. `make mutation MUTATE="bootstrap early_stopping"` picks entries;
# MUTATION_JOBS sets mutmut's worker processes.
MUTATION_TARGETS := \
	early_stopping:train/early_stopping.py:tests/test_early_stopping.py \
	bootstrap:ranking/bootstrap.py:tests/test_bootstrap.py \
	metrics:ranking/metrics.py:tests/test_metrics.py \
	splits:data/splits.py:tests/test_data_splits.py \
	losses:losses/*:tests/test_losses.py,tests/test_losses_siamese.py,tests/test_similarity_init.py,tests/test_losses_gather.py \
	checkpoint:train/checkpoint.py:tests/test_checkpoint_files.py,tests/test_checkpoint_recovery.py,tests/test_early_stopping.py,tests/test_optim.py \
	identity:models/backbone.py,models/factory.py:tests/test_model_identity.py:*backbone.x*identity__mutmut_*,*backbone.x*_tensors__mutmut_*,*backbone.x*_prefixes__mutmut_*,*backbone.x_write_config__mutmut_*,*factory.x_load_model__mutmut_*,*factory.x__head_hash__mutmut_* \
	scoring:suites/scoring.py:tests/test_suites.py
MUTATE ?= $(foreach t,$(MUTATION_TARGETS),$(firstword $(subst :, ,$(t))))
MUTATION_JOBS ?= 2
MUTATION_DIR ?= $(VENV)/mutation

mutation: $(TEST_STAMP)
	$(PY) -m pip install --quiet -e ".[mutation]"
	@set -e; for name in $(MUTATE); do \
	  entry=$$(echo '$(MUTATION_TARGETS)' | tr ' ' '\n' | grep "^$$name:" || true); \
	  [ -n "$$entry" ] || { echo "mutation: no entry '$$name' in MUTATION_TARGETS"; exit 2; }; \
	  files=$$(echo "$$entry" | cut -d: -f2 | sed 's|[^,]*|"src/cliptune/&"|g'); \
	  tests=$$(echo "$$entry" | cut -d: -f3 | sed 's|[^,]*|"&"|g'); \
	  mutants=$$(echo "$$entry" | cut -d: -f4 | tr ',' ' '); \
	  dir=$(MUTATION_DIR)/$$name; rm -rf "$$dir"; mkdir -p "$$dir"; cp -r src tests docs pyproject.toml "$$dir"; \
	  sed -i -e "s|^only_mutate = .*|only_mutate = [$$files]|" -e "s|^source_paths = .*|&\nalso_copy = [\"docs\"]|" \
	    -e "s|^pytest_add_cli_args_test_selection = .*|pytest_add_cli_args_test_selection = [$$tests]|" \
	    "$$dir/pyproject.toml"; \
	  echo "== mutation $$name: [$$files] by [$$tests] $$mutants"; \
	  (set -f; cd "$$dir" && env -u PYTHONPATH OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
	    $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATION_JOBS) $$mutants > run.log 2>&1 || { tail -c 4000 run.log; exit 1; }; \
	    tail -c 200 run.log | tr '\r' '\n' | tail -n 2; \
	    $(abspath $(VENV))/bin/mutmut results > survivors.txt 2>&1; \
	    for m in $$(grep -v ': not checked$$' survivors.txt | grep -o '^ *[^ :]*__mutmut_[0-9]*'); do $(abspath $(VENV))/bin/mutmut show $$m; done \
	      > survivors.diff 2>&1; \
	    echo "survivors: $$(grep -c ': survived' survivors.txt || true) (diffs in $$dir/survivors.diff)"); \
	done

docs: install
	$(VENV)/bin/cliptune config docs --out docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
