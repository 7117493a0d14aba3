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

# The results in docs/results.md: every benchmark with the default encoder (grid, selected on valid F1), and
# LLM2Vec over SmolLM2-135M (untrained) on two of them.
DATASETS ?= ../shared/datasets
BENCHMARKS := abt_buy dirty_itunes_amazon dirty_dblp_acm dirty_dblp_scholar dirty_walmart_amazon
PRODUCT_INSTRUCTION := Represent the text for finding another product description for the same product

.PHONY: results results-smollm2 results-trained results-smollm2-trained
results: setup
	for name in $(BENCHMARKS); do \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --grid --out eval-out/minilm/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/minilm/*/report.json

results-smollm2: smollm2
	for name in abt_buy dirty_dblp_acm; do \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder smollm2 --instruction "$(PRODUCT_INSTRUCTION)" \
	    --out eval-out/smollm2/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/smollm2/*/report.json

# Issue-4 results: MiniLM fine-tuned per dataset on its train.csv (checkpoint chosen on valid.csv), then
# evaluated like the untrained encoder. TRAIN_FLAGS caps the work on a CPU; drop it on a GPU.
TRAIN_FLAGS ?= --max-steps 60
results-trained: setup
	for name in $(BENCHMARKS); do \
	  $(BIN)/llmatch train $(DATASETS)/$$name --base minilm --out trained/minilm/$$name $(TRAIN_FLAGS) || exit 1; \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder trained/minilm/$$name/supervised \
	    --out eval-out/minilm-trained/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/minilm-trained/*/report.json

# SmolLM2-135M through the LLM2Vec recipe (MNTP, SimCSE) and then supervised, with CPU-sized settings.
SMOLLM2_DATASETS ?= abt_buy
SMOLLM2_FLAGS ?= --max-steps 100
results-smollm2-trained: smollm2
	for name in $(SMOLLM2_DATASETS); do \
	  $(BIN)/llmatch train $(DATASETS)/$$name --base smollm2 --stages mntp,simcse,supervised \
	    --instruction "$(PRODUCT_INSTRUCTION)" --out trained/smollm2/$$name $(SMOLLM2_FLAGS) || exit 1; \
	  for stage in simcse supervised; do \
	    $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder trained/smollm2/$$name/$$stage \
	      --out eval-out/smollm2-$$stage/$$name || exit 1; done; done
	$(BIN)/python -m evaluation.summarize eval-out/smollm2-*/*/report.json
