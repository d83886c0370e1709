# dlops: `make demo` runs everything end to end on generated data; `make test` runs the tests.
# Every target that needs Python first creates .venv with the pinned packages (make setup).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DLOPS  := $(BIN)/dlops
STAMP  := $(VENV)/.installed

# make train-resnet DATA=... EPOCHS=... ARCH=... (any other option: ARGS="--amp bf16 ...")
# make train-lm LM_DATA=... MODEL=... LM_EPOCHS=... LM_LR=...; make generate CHECKPOINT=... WORDS=... PROMPT=...
DATA        ?= data/synthetic
EPOCHS      ?= 20
ARCH        ?= resnet18
BATCH       ?= 256
LR          ?= 0.1
DEVICE      ?= auto
CHECKPOINT  ?=
ARGS        ?=
LM_DATA     ?= data/corpus
MODEL       ?= LSTM
LM_EPOCHS   ?= 6
LM_LR       ?= 20
WORDS       ?= 1000
PROMPT      ?=
TEMPERATURE ?= 1.0
OUTF        ?= generated.txt
KIND        ?= resnet
IMAGE       ?= data/synthetic/val/images/val_0.JPEG
SERVE_ARGS  ?=
STATE_DIR   ?= logs/torchserve
DEMO_STATE  ?= logs/demo-torchserve
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1
# make mlflow-server: SQLite in mlruns/ unless $MLFLOW_BACKEND_STORE_URI names another store
MLFLOW_BACKEND_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
MLFLOW_ARTIFACTS   ?= $(CURDIR)/mlruns/artifacts
TB_PORT     ?= 6006

.PHONY: mlflow-server screenshots gpu-check doctor sync report lock
.PHONY: promote deploy rollback docker-bases docker-check
.PHONY: setup demo train-resnet evaluate train-lm generate package serve stop predict generate-http mlflow-ui \
	tensorboard test lint format clean

setup: $(STAMP)

# Every package comes from requirements.lock and must match one of its SHA-256 hashes (pip itself
# included); the project is installed from this folder with the lock's setuptools, nothing else fetched.
$(STAMP): requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (python3.11 not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# After changing a pin in requirements.in: the hashed locks, for this project and its serving image
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	--strip-extras --no-annotate --no-emit-index-url --no-emit-find-links
# pip's hash-checking mode refuses a dependency's extra (evidently needs pandas[parquet], uvicorn[standard])
# unless the lock pins the package with that extra too: scripts/lock_extras.py adds those entries.
lock: setup
	$(PIP_COMPILE) -o requirements.lock requirements.in
	$(BIN)/python scripts/lock_extras.py requirements.lock 'pandas[parquet]' 'uvicorn[standard]'
	$(PIP_COMPILE) -c requirements.in -o docker/serve.lock docker/serve.in

data/synthetic/wnids.txt: | $(STAMP)
	$(DLOPS) data synth data/synthetic --classes 10 --train-per-class 100 --val-per-class 20

data/corpus/train.txt: | $(STAMP)
	$(DLOPS) data synth-corpus data/corpus

demo: setup data/synthetic/wnids.txt data/corpus/train.txt
	$(DLOPS) train resnet data/synthetic --epochs 3 -b 32 --lr 0.02 --scheduler cosine -p 10 \
		--out-dir runs/demo-resnet --run-name demo-resnet
	$(DLOPS) train lm data/corpus --model LSTM --epochs 3 --emsize 64 --nhid 64 --lr 20 --log-interval 20 \
		--out-dir runs/demo-lm --run-name demo-lm
	$(DLOPS) generate --checkpoint $$(ls -t runs/demo-lm/*/best.pt | head -1) --words 60 \
		--prompt "the old cat" --outf runs/demo-lm/generated.txt
	@echo; echo "Generated text (runs/demo-lm/generated.txt):"; cat runs/demo-lm/generated.txt
	@if ! command -v java >/dev/null; then \
		echo "Skipping the HTTP part of the demo: TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)"; \
	else \
		$(DLOPS) serve --state-dir $(DEMO_STATE) --model models:/resnet-tinyimagenet/latest \
			--model models:/wordlm-wikitext2/latest $(SERVE_ARGS) && { \
			echo "POST $(IMAGE) to /predictions/resnet:"; $(DLOPS) predict $(IMAGE) --field topk=3 --state-dir $(DEMO_STATE) && \
			echo "POST a prompt to /predictions/lm:"; $(DLOPS) generate-http --prompt "the old cat" --max-words 20 --seed 1 \
				--state-dir $(DEMO_STATE); \
			rc=$$?; $(DLOPS) stop --state-dir $(DEMO_STATE); exit $$rc; }; \
	fi
	$(DLOPS) report --experiment resnet-tinyimagenet --experiment wordlm-wikitext2 --max-runs 1 \
		--filter "tags.mlflow.runName LIKE 'demo-%'" --title "dlops demo" --out reports/demo \
		--mlflow-url http://127.0.0.1:$(MLFLOW_PORT)
	@echo
	@echo "Report of the demo runs: reports/demo/report.html (and report.md)"
	@echo "Done. Browse the runs with: make mlflow-ui   (then open http://127.0.0.1:$(MLFLOW_PORT))"
	@echo "TensorBoard:                  make tensorboard (then open http://127.0.0.1:$(TB_PORT))"

train-resnet: setup
	$(DLOPS) train resnet $(DATA) --epochs $(EPOCHS) -a $(ARCH) -b $(BATCH) --lr $(LR) --device $(DEVICE) $(ARGS)

evaluate: setup
	@test -n "$(CHECKPOINT)" || { echo "pass CHECKPOINT=runs/<run id>/best.pt"; exit 1; }
	$(DLOPS) evaluate --checkpoint $(CHECKPOINT) $(DATA) $(ARGS)

train-lm: setup
	$(DLOPS) train lm $(LM_DATA) --model $(MODEL) --epochs $(LM_EPOCHS) --lr $(LM_LR) --device $(DEVICE) $(ARGS)

generate: setup
	@test -n "$(CHECKPOINT)" || { echo "pass CHECKPOINT=runs/<run id>/best.pt (a language-model checkpoint)"; exit 1; }
	$(DLOPS) generate --checkpoint $(CHECKPOINT) --words $(WORDS) --temperature $(TEMPERATURE) \
		--prompt "$(PROMPT)" --outf $(OUTF) $(ARGS)

package: setup
	@test -n "$(CHECKPOINT)" || { echo "pass KIND=resnet|lm CHECKPOINT=runs/<run id>/best.pt"; exit 1; }
	$(DLOPS) package $(KIND) --checkpoint $(CHECKPOINT) $(ARGS)

serve: setup
	@command -v java >/dev/null || { echo "TorchServe needs Java 17: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }
	$(DLOPS) serve --state-dir $(STATE_DIR) $(SERVE_ARGS)

stop: setup
	$(DLOPS) stop --state-dir $(STATE_DIR)

# The registry drives serving: make promote URI=models:/resnet-tinyimagenet/3 [ALIAS=champion] [ARGS=--if-better]
# make deploy SOURCE=models:/resnet-tinyimagenet@champion; make rollback NAME=resnet (STATE_DIR: which server)
URI    ?=
ALIAS  ?= champion
SOURCE ?=
NAME   ?= resnet
promote: setup
	@test -n "$(URI)" || { echo "pass URI=models:/NAME/VERSION"; exit 1; }
	$(DLOPS) promote $(URI) --alias $(ALIAS) $(ARGS)

deploy: setup
	@test -n "$(SOURCE)" || { echo "pass SOURCE=models:/NAME@ALIAS (or a checkpoint, or a .mar)"; exit 1; }
	$(DLOPS) deploy $(SOURCE) --state-dir $(STATE_DIR)

rollback: setup
	$(DLOPS) rollback $(NAME) --state-dir $(STATE_DIR)

predict: setup
	$(DLOPS) predict $(IMAGE) --state-dir $(STATE_DIR) $(ARGS)

generate-http: setup
	$(DLOPS) generate-http --prompt "$(PROMPT)" --state-dir $(STATE_DIR) $(ARGS)

# MLflow's background job runners serve its GenAI features, which dlops does not use: off, 8 processes fewer
MLFLOW_ENV := MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

mlflow-ui: setup
	@mkdir -p mlruns
	$(MLFLOW_ENV) $(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --default-artifact-root $(CURDIR)/mlruns/artifacts

# The team's server, with logins (MLflow's basic-auth app): the admin's password from MLFLOW_AUTH_ADMIN_PASSWORD or
# MLFLOW_ADMIN_PASSWORD_FILE (on loopback without either, one is made once in mlruns/auth/admin-password).
# MLFLOW_HOST=0.0.0.0 serves other machines by this machine's names and addresses; MLFLOW_ALLOWED_HOSTS adds names.
MLFLOW_ADMIN_PASSWORD_FILE ?=
# A store with a password: export MLFLOW_BACKEND_STORE_URI=postgresql://... (it then wins over MLFLOW_BACKEND_URI,
# and no command line shows it); off loopback TLS is needed: MLFLOW_TLS=auto, or MLFLOW_TLS_CERT/_KEY files
mlflow-server: setup
	$(DLOPS) tracking-server $(if $(MLFLOW_BACKEND_STORE_URI),,--backend-store-uri $(MLFLOW_BACKEND_URI)) \
		--artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		$(if $(MLFLOW_TLS),--tls $(MLFLOW_TLS)) $(if $(MLFLOW_TLS_CERT),--tls-cert $(MLFLOW_TLS_CERT) --tls-key $(MLFLOW_TLS_KEY)) \
		$(if $(MLFLOW_ADMIN_PASSWORD_FILE),--admin-password-file $(MLFLOW_ADMIN_PASSWORD_FILE))

screenshots: setup data/synthetic/wnids.txt
	$(BIN)/python scripts/screenshots.py

tensorboard: setup
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port $(TB_PORT)

# Test files run in TEST_WORKERS processes (a file's tests stay together: they share its fixtures);
# --durations prints the slowest tests, so a slow one is seen when it lands.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=15

# What this machine offers (torch, CUDA, GPUs, CPU ISA, native bf16), a speed probe, the options to use.
doctor: setup
	$(DLOPS) doctor

# Deliver tracking journals a tracking-server outage (or --offline) left behind: make sync RUNS=runs
RUNS ?= runs
sync: setup
	$(DLOPS) sync $(RUNS)

# A report of an experiment's runs: make report EXPERIMENT=resnet-tinyimagenet [FILTER="params.arch = 'resnet18'"]
EXPERIMENT ?= resnet-tinyimagenet
FILTER ?=
report: setup
	$(DLOPS) report --experiment $(EXPERIMENT) --filter "$(FILTER)" --out reports/$(EXPERIMENT) \
		--mlflow-url http://127.0.0.1:$(MLFLOW_PORT)

# Every GPU-only code path once, on a CUDA machine (refuses at once without one). Runs from a bare
# checkout with the mini slice copied beside it; uses .venv when there, else python3.
GPU_DATA   ?= $(firstword $(wildcard ../shared/data/tiny-imagenet-200-mini gpu-data/tiny-imagenet-200-mini))
GPU_OUT    ?= gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_check.py $(if $(GPU_DATA),--data $(GPU_DATA)) --out $(GPU_OUT)

# The team stack built and run here: stand-in base images from Debian's packages where no image
# registry is reachable, then both images, compose up, train -> register -> deploy -> predict, teardown.
docker-bases:
	bash docker/bases.sh

docker-check: setup
	$(BIN)/python scripts/docker_check.py

lint: setup
	$(BIN)/ruff check training serving release monitoring examples tests bench scripts
	$(BIN)/ruff format --check training serving release monitoring examples tests bench scripts
	$(BIN)/hadolint --failure-threshold info docker/Dockerfile.train docker/Dockerfile.serve docker/Dockerfile.postgres

format: setup
	$(BIN)/ruff format training serving release monitoring examples tests bench scripts
	$(BIN)/ruff check --fix training serving release monitoring examples tests bench scripts

# Everything the commands generate (the demo's data, decoded caches); downloaded datasets in data/ stay
clean:
	rm -rf runs data/synthetic data/corpus data/cache model_store logs reports gpu-check .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "kept mlruns/ (your tracking history), .venv and downloaded datasets; remove them by hand if you mean to"
