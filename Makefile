# The README's commands. `make setup` is a no-op when pyproject.toml has not changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-fast ui lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

repro: setup
	dvc repro
	vpipe report

test: setup
	pytest

test-fast: setup
	pytest -m "not slow"

ui: setup
	vpipe ui --port $(or $(PORT),5000)

lint: setup
	ruff check pipeline data_scripts tests bench

bench: setup
	@if ls bench/*.py >/dev/null 2>&1; then for b in bench/*.py; do python $$b || exit 1; done; else echo "no benchmarks yet"; fi
