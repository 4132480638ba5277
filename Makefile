# Two commands: `make book` builds the executed book, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup data book test unit notebooks check-pages benchmark clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

# Installs the two Debian data packages when missing (as root on Debian/Ubuntu), else prints the command.
data: setup
	$(BIN)/python -m lmpg_utils data --install

book: data
	$(BIN)/jupyter-book build . -W -n --keep-going

unit: data
	$(BIN)/python -m pytest -q tests

notebooks: data
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env -n $(PYTEST_WORKERS) --dist loadfile chapters

test: unit notebooks

clean:
	rm -rf _build
