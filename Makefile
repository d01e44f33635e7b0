# A newcomer's commands: `make serve` (a first answer from /recommend in minutes), `make run` (the whole
# pipeline on MovieLens) and `make test`.
# `make eval`: the reviewer-grade evaluation (every protocol, every tuned baseline and hybrid, 3 seeds) per dataset.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
DATASET ?= movielens-latest-small
RUN ?= runs/$(DATASET)
PORT ?= 8000
# the llmrec image (Dockerfile) that cluster/kuberay/*.yaml run: push it to your registry and use that name
IMAGE ?= ghcr.io/YOUR-ORG/llmrec
VARIANT ?= cpu
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' llmrec/__init__.py)
IMAGE_TAG := $(IMAGE):$(VERSION)$(if $(filter gpu,$(VARIANT)),-gpu,)
# Ray 2.60 on one machine: loopback listeners, explicit auth mode; the model loads from the local package.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export LLMREC_DATA_DIR ?= $(abspath $(DATA))

# datasets `make eval` evaluates (override: make eval EVAL_DATASETS=amazon-all-beauty-5core-2018), and extra
# `llmrec evaluate` flags (e.g. EVAL_FLAGS="--max-test-users 100" for a quick check of the command)
EVAL_DATASETS ?= movielens-latest-small amazon-scientific-unisrec amazon-magazine-subscriptions-2018 \
	amazon-all-beauty-5core-2018 amazon-musical-instruments-5core-2014 mind-small-sample
EVAL_FLAGS ?=

.PHONY: install run serve eval test test-slow test-faults test-all bench image constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# the CPU torch build first (pinned), so nothing below can pull a multi-GB CUDA torch
	$(BIN)/pip install -q torch==2.13.0
	# llmrec with the cpu (faiss-cpu), eval (evaluate's baselines and plots) and dev (tests) extras, at the
	# versions of constraints.txt (the environment the tests passed in)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,eval,dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/llmrec pipeline --dataset $(DATASET) --source $(DATA)/$(DATASET) --out $(RUN)

# The fast first answer: prepare, embed and index (reused when current), then serve at once with the text
# user vector; the scorer trains in a background process meanwhile and is swapped in when it is ready.
serve: install
	$(BIN)/llmrec pipeline --dataset $(DATASET) --source $(DATA)/$(DATASET) --out $(RUN) \
	    --stages prepare,embed,index
	$(BIN)/llmrec serve --run $(RUN) --port $(PORT) --train-in-background

# per dataset: the run's stages up to train (reused when current; the scorer's settings are what evaluation
# trains llmrec with), then `llmrec evaluate --full` into runs/<dataset>/eval-full (RUN/eval stays the
# pipeline's evaluation of the served scorer)
eval: install
	set -e; for d in $(EVAL_DATASETS); do \
	  $(BIN)/llmrec pipeline --dataset $$d --source $(DATA)/$$d --out runs/$$d --stages prepare,embed,index,train; \
	  $(BIN)/llmrec evaluate --full --data runs/$$d/data --run runs/$$d --out runs/$$d/eval-full $(EVAL_FLAGS); \
	done

# the lint first (pyproject.toml's ruff rules, seconds), then the default suite
test: install
	$(BIN)/ruff check llmrec tests benchmarks jobs
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m 'slow or faults'

# full disk, kill -9 of a shard mid-batch, replica kill, corrupt record, Redis restart; the 10,000-request fuzzer
test-faults: install
	$(BIN)/python -m pytest -m faults

test-all: install
	$(BIN)/python -m pytest -m 'slow or faults or not slow'

# each benchmark prints a JSON report with ratios against a named baseline measured in the same run
bench: install
	mkdir -p runs/bench
	$(BIN)/python benchmarks/embed.py --data $(DATA) --out runs/bench/embed.json
	$(BIN)/python benchmarks/index.py --sizes 10000 100000 --json runs/bench/index.json
	$(BIN)/python benchmarks/train.py --epochs 2 --out runs/bench/train.json
	$(BIN)/python benchmarks/serve_load.py --sizes 10000 100000 --out runs/bench/serve_load.json
	$(BIN)/python benchmarks/state_load.py --out runs/bench/state_load.json
	$(BIN)/python benchmarks/state_faults.py --users 20000 --out runs/bench/state_faults.json

# the image of cluster/kuberay/*.yaml: `make image` (CPU pods), `make image VARIANT=gpu` (GPU pods)
image:
	docker build --build-arg VARIANT=$(VARIANT) -t $(IMAGE_TAG) .
	@echo "built $(IMAGE_TAG); push it: docker push $(IMAGE_TAG)"

# re-pin constraints.txt from the tested environment (after changing pyproject.toml's dependencies)
constraints: install
	$(BIN)/python cluster/write_constraints.py

clean:
	rm -rf $(VENV) runs .pytest_cache
