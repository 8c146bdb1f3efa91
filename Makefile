# One entry point for every recurring command. `make demo` and `make test` create .venv when missing.
# On a machine whose default torch wheel is a CUDA build, pass the CPU index, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and on a GPU machine install the CUDA build instead: see README "GPU".
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_ROWS ?= 100000

.PHONY: setup demo test test-slow test-gpu lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(PIP_TORCH_INDEX) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Synthesize data, train an LMA DLRM at 16x, export it, serve it on $(HOST):$(PORT).
demo: setup
	$(BIN)/lma synth --rows $(DEMO_ROWS) --out data/demo.tsv --seed 0
	$(BIN)/lma train --data data/demo.tsv --embedding lma --compression 16 --preset small --epochs 1 --out runs/demo
	$(BIN)/lma export runs/demo --out artifacts/demo
	@echo
	@echo "Score a row:"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/v1/models/demo:predict -H 'content-type: application/json' \\"
	@echo "    -d '{\"instances\": [{\"dense\": [1,2,null,0,5,1,0,3,4,0,1,0,2], \"categorical\": [\"68fd1e64\",\"80e26c9b\",null,\"1f89b562\",\"25c83c98\",\"7e0ccccf\",\"de7995b8\",\"1f89b562\",\"a73ee510\",\"a8cd5504\",\"b2cb9c98\",\"37c9c164\",\"2824a5f6\",\"1adce6ef\",\"8ba8b39a\",\"891b62e7\",\"e5ba7672\",\"f54016b9\",\"21ddcdc9\",\"b1252a9d\",\"07b5194c\",null,\"3a171ecb\",\"c5c50484\",\"e8b83407\",\"9727dd16\"]}]}'"
	@echo
	$(BIN)/lma serve artifacts/demo --host $(HOST) --port $(PORT)

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

clean:
	rm -rf $(VENV) data runs artifacts .pytest_cache .mypy_cache .ruff_cache
