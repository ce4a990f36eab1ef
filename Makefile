# Two commands for a fresh machine:  make repro  and  make test  (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# No phone-home from DVC or MLflow, here or in anything the targets start.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro tune test test-fast bench bench-quality clean-outputs

install: $(STAMP)

# torch is installed first with its exact pin: that takes the CPU wheel on this machine instead of
# pulling GBs of CUDA packages through a looser requirement.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

## make repro: synthetic data if data/ has none, then the whole DVC pipeline, then the metrics table.
repro: $(STAMP)
	@if [ ! -f data/train/train.tsv ]; then echo "data/ holds no dataset: writing the synthetic one (params.yaml: synth)"; mmrecall synth --no-progress; fi
	dvc add data --quiet
	dvc repro
	@echo; mmrecall report

## make tune: the Optuna study (tune/dvc.yaml, its own pipeline: make repro never starts it); writes best_params.yaml.
tune: $(STAMP)
	dvc repro tune/dvc.yaml

## make test: the whole suite, the end-to-end dvc repro included (make test-fast skips `slow`).
## TEST_WORKERS pytest-xdist processes share the tests (each idle worker takes the next test); 1 runs them in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal)

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_train.py

## make bench-quality: the default pipeline on a grid of synthetic worlds (~4-12 min each; BENCHMARKS.md).
bench-quality: $(STAMP)
	$(BIN)/python bench/bench_quality.py

clean-outputs:
	rm -rf features outputs metrics reports
