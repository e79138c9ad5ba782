# One entry point for setting up, running and testing pneumo.
PYTHON  ?= python3
VENV    ?= .venv
# Pins the version only. On PyPI (Linux x86_64) this is the CUDA build with its nvidia-*
# libraries (several GB); pip finds a CPU wheel only where its config points at one.
# CPU build: make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
# A GPU build: make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH   ?= torch==2.13.0
SOURCE  ?= kaggle:paultimothymooney/chest-xray-pneumonia
WORKDIR ?= ./pneumo-data
ARGS    ?=

BIN := $(VENV)/bin

# Deployments (infra/prefect.yaml): where the deployed runs read and write.
DEPLOY_SOURCE  ?= $(SOURCE)
DEPLOY_WORKDIR ?= s3://pneumo/pneumo-data

.PHONY: setup run test test-fast clean stack-up stack-down stack-status worker deploy
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/python flows/full.py --source "$(SOURCE)" --workdir "$(WORKDIR)" $(ARGS)

# Two pytest-xdist workers (the machine's 2 cores); tests marked xdist_group stay on one worker
# (a module's shared fixture is built once). Plain `pytest` stays serial for debugging.
XDIST   ?= -n 2 --dist loadgroup

test: setup
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

# Unit tests (without the ones marked slow) and one end-to-end run through Prefect.
test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow" tests/code tests/data \
		"tests/flows/test_full_flow.py::test_first_run_registers_v0001_with_a_complete_card" $(ARGS)

clean:
	rm -rf $(VENV) $(WORKDIR)

# Local services: S3 endpoint, Prefect server, `process` work pool and worker (infra/stack.sh).
stack-up: setup
	infra/stack.sh up

stack-down:
	infra/stack.sh down

stack-status:
	infra/stack.sh status

# Only the pool and a worker, for a remote Prefect server and real S3 (your own settings).
worker: setup
	infra/stack.sh worker

deploy: setup
	PNEUMO_SOURCE="$(DEPLOY_SOURCE)" PNEUMO_WORKDIR="$(DEPLOY_WORKDIR)" infra/stack.sh deploy
