# One entry point for setting up, running and testing pneumo.
PYTHON  ?= python3
VENV    ?= .venv
# The CPU wheel: a bare `torch` can pull a multi-GB CUDA build. Override for GPUs,
# e.g. make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH   ?= torch==2.13.0
SOURCE  ?= kaggle:paultimothymooney/chest-xray-pneumonia
WORKDIR ?= ./pneumo-data
ARGS    ?=

BIN := $(VENV)/bin

.PHONY: setup run test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/python flows/full.py --source "$(SOURCE)" --workdir "$(WORKDIR)" $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) $(WORKDIR)
