# One entry point for every recurring command. `make demo` and `make test` create .venv when missing.
# On a machine whose default torch wheel is a CUDA build, pass the CPU index, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and on a GPU machine install the CUDA build instead: see README "GPU".
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := deploy/locks/dev.txt
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_ROWS ?= 100000
# Where the demo writes data/, runs/ and artifacts/ (default: this folder; the CI smoke uses a scratch one).
DEMO_ROOT ?=
D := $(if $(DEMO_ROOT),$(DEMO_ROOT)/,)

.PHONY: setup demo demo-build test test-slow test-gpu lint format bench lock image-check clean

# Everything for development: torch (the pinned CPU build, constraints.txt), then every other package from the
# lock with its hashes, then the project itself. `pip check` fails here when the lock misses a dependency that
# pyproject.toml names: run `make lock`.
$(STAMP): pyproject.toml constraints.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(PIP_TORCH_INDEX) torch==2.13.0
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check || { echo "the lock misses what pyproject.toml asks for: run make lock" >&2; exit 1; }
	touch $(STAMP)

setup: $(STAMP)

# Synthesize data, train an LMA DLRM at 16x, export it (every folder it writes is created first).
demo-build: setup
	mkdir -p $(D)data $(D)runs $(D)artifacts
	$(BIN)/lma synth --rows $(DEMO_ROWS) --out $(D)data/demo.tsv --seed 0
	$(BIN)/lma train --data $(D)data/demo.tsv --embedding lma --compression 16 --preset small --epochs 1 --out $(D)runs/demo --overwrite $(if $(DEMO_ROOT),--cache-dir $(D)data/cache,)
	$(BIN)/lma export $(D)runs/demo --out $(D)artifacts/demo

# ... and serve it on $(HOST):$(PORT), after printing the README's curl command that scores a row.
demo: demo-build
	@echo
	@echo "Score a row:"
	@$(BIN)/python deploy/demo_request.py --curl http://$(HOST):$(PORT)
	@echo
	$(BIN)/lma serve $(D)artifacts/demo --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

test-gpu: setup
	$(BIN)/python -m pytest -m gpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/lma bench --out docs/BENCHMARKS.md

# Rewrite deploy/locks/*.txt after editing pyproject.toml's dependencies (ARGS=--upgrade: newest allowed).
# Needs only uv (from the [dev] extra; bootstrapped when .venv has none), not an up-to-date .venv.
lock:
	test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q 'uv>=0.5'; }
	$(BIN)/python deploy/lock.py $(ARGS)

# Build the CPU serving image with podman and run it (deploy/check-image.sh; needs root, podman, debootstrap).
image-check:
	nice -n 10 bash deploy/check-image.sh

clean:
	rm -rf $(VENV) data runs artifacts .pytest_cache .mypy_cache .ruff_cache
