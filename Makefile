# Two commands: `make book` builds the executed book, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup data book browser test unit notebooks check-pages benchmark clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
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

# One thread, as under `make notebooks`, so the book shows the very numbers the tests checked.
book: data $(VENDOR_STAMP)
	LMPG_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/jupyter-book build . -W -n --keep-going

# Opens every built page in headless Chromium: math typeset, diagrams drawn, no errors, nothing remote.
check-pages: book browser
	$(BIN)/python scripts/check_pages.py _build/html

# Debian's Chromium for the page check: installed with apt-get when missing and we are root.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  { echo "Chromium is missing: sudo apt-get install -y chromium"; exit 1; }

unit: data
	$(BIN)/python -m pytest -q tests

# Two notebooks run at once on a 2-core machine: one thread each, or OpenMP threads
# spin against each other and training slows down many times over.
notebooks: data
	LMPG_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env -n $(PYTEST_WORKERS) --dist loadfile chapters

test: unit notebooks

# A speed report (attention against PyTorch, KV-cache generation, GPT training tokens/s); always exits 0.
benchmark: data
	$(BIN)/python benchmarks/bench_attention.py

clean:
	rm -rf _build
