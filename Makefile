# dlops: `make demo` runs everything end to end on generated data; `make test` runs the tests.
# Every target that needs Python first creates .venv with the pinned packages (make setup).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DLOPS  := $(BIN)/dlops
STAMP  := $(VENV)/.installed

# make train-resnet DATA=... EPOCHS=... ARCH=... (any other option: ARGS="--amp bf16 ...")
DATA        ?= data/synthetic
EPOCHS      ?= 20
ARCH        ?= resnet18
BATCH       ?= 256
LR          ?= 0.1
DEVICE      ?= auto
CHECKPOINT  ?= $(lastword $(sort $(wildcard runs/*/best.pt)))
ARGS        ?=
MLFLOW_PORT ?= 5000
TB_PORT     ?= 6006

.PHONY: setup demo train-resnet evaluate mlflow-ui tensorboard test lint format clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (python3.11 not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

data/synthetic/wnids.txt: | $(STAMP)
	$(DLOPS) data synth data/synthetic --classes 10 --train-per-class 100 --val-per-class 20

demo: setup data/synthetic/wnids.txt
	$(DLOPS) train resnet data/synthetic --epochs 3 -b 32 --lr 0.02 --scheduler cosine -p 10 --run-name demo-resnet
	@echo
	@echo "Done. Browse the runs with: make mlflow-ui   (then open http://127.0.0.1:$(MLFLOW_PORT))"
	@echo "TensorBoard:                  make tensorboard (then open http://127.0.0.1:$(TB_PORT))"

train-resnet: setup
	$(DLOPS) train resnet $(DATA) --epochs $(EPOCHS) -a $(ARCH) -b $(BATCH) --lr $(LR) --device $(DEVICE) $(ARGS)

evaluate: setup
	@test -n "$(CHECKPOINT)" || { echo "no checkpoint: pass CHECKPOINT=runs/<run id>/best.pt"; exit 1; }
	$(DLOPS) evaluate --checkpoint $(CHECKPOINT) $(DATA) $(ARGS)

mlflow-ui: setup
	@mkdir -p mlruns
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --default-artifact-root $(CURDIR)/mlruns/artifacts

tensorboard: setup
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port $(TB_PORT)

test: setup
	$(BIN)/pytest -q tests

lint: setup
	$(BIN)/ruff check training tests
	$(BIN)/ruff format --check training tests

format: setup
	$(BIN)/ruff format training tests
	$(BIN)/ruff check --fix training tests

clean:
	rm -rf runs data/synthetic model_store logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "kept mlruns/ (your tracking history) and .venv; remove them by hand if you mean to"
