# Every target builds .venv from nothing, so a fresh machine needs only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60

.PHONY: venv bytecode demo test test-all lint bench fuzz clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The README's first command: a live migration of a file another process keeps writing.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The tests start multifd hundreds of times; with PYTHONDONTWRITEBYTECODE set (as in
# some shells and CI images) each start would compile every module from source.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q multifd_cli

# Pairwise coverage of the option matrix; stays well under 10 minutes on 2 cores.
test: bytecode
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# The full matrix.
test-all: bytecode
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check multifd_cli tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_decoder.py $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
