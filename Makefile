# The README's commands. `make setup` is a no-op when pyproject.toml has not changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-fast ui lint bench bench-repro bench-scale bench-codec seeds unseen

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# `make repro TARGETS='train@own_lstm'`: only those stages (and what they need), then the report.
repro: setup
	dvc repro $(TARGETS)
	vpipe report

test: setup
	pytest

test-fast: setup
	pytest -m "not slow"

ui: setup
	vpipe ui --port $(or $(PORT),5000)

lint: setup
	ruff check pipeline data_scripts tests bench
	ruff format --check pipeline data_scripts tests bench

# The component benchmarks (bench/repro.py and bench/seeds.py re-run the pipeline: their own targets).
bench: setup
	@for b in bench/extract.py bench/features.py bench/train.py; do python $$b || exit 1; done

# Every stage of `dvc repro` timed against its limit (re-runs them all).
bench-repro: setup
	python bench/repro.py --force

# The stages on a dataset shaped like a real one (1,000 clips of 10 s), projected to UCF101 and Kinetics-400.
bench-scale: setup
	python bench/scale.py

# A JPEG frame store against a raw one: bytes, extraction, an end-to-end epoch, the features stage.
bench-codec: setup
	python bench/codec.py

# Every head over cached features and both captioners as mean ± sd over 3 seeds (after `make repro`):
# bench/results/seeds.json, the first table of `vpipe report`.
seeds: setup
	python bench/seeds.py

# Captions and classes of clips from another generator seed, side by side (after `make repro`).
unseen: setup
	python bench/unseen.py
