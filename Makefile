# Two entry points for a fresh clone: `make demo` and `make test`. Each creates or refreshes .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-run

demo: $(VENV)/.installed-run
	$(BIN)/imgclf demo --data demo-data --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench docs notebooks
	$(BIN)/ruff format --check src tests bench docs
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_features.py ../shared/datasets/flowers5

clean:
	rm -rf runs demo-data .pytest_cache .ruff_cache
