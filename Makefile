# Two commands for a newcomer:  `make run`  (the whole pipeline on MovieLens)  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
DATASET ?= movielens-latest-small
RUN ?= runs/$(DATASET)
# Ray 2.60 on one machine: loopback listeners, explicit auth mode; the model loads from the local package.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export LLMREC_DATA_DIR ?= $(abspath $(DATA))

.PHONY: install run test test-slow test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# the CPU torch build first (pinned), so nothing below can pull a multi-GB CUDA torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/llmrec pipeline --dataset $(DATASET) --source $(DATA)/$(DATASET) --out $(RUN)

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest -m 'slow or not slow'

# each benchmark prints a JSON report with ratios against a named baseline measured in the same run
bench: install
	mkdir -p runs/bench
	$(BIN)/python benchmarks/embed.py --data $(DATA) --out runs/bench/embed.json
	$(BIN)/python benchmarks/index.py --sizes 10000 100000 --json runs/bench/index.json
	$(BIN)/python benchmarks/train.py --epochs 2 --out runs/bench/train.json
	$(BIN)/python benchmarks/serve_load.py --sizes 10000 100000 --out runs/bench/serve_load.json
	$(BIN)/python benchmarks/state_load.py --out runs/bench/state_load.json

clean:
	rm -rf $(VENV) runs .pytest_cache
