# kivi-serve: one-command install, test and serve.
#   make test    create/update .venv, install everything, prepare the embedded model, run pytest
#   make serve   same install, then serve the embedded model on http://127.0.0.1:8000
# Variables: PYTHON (interpreter that creates the venv), KIND (cpu|gpu, auto-detected),
#            PYTEST_ARGS (extra pytest arguments), SERVE_ARGS (extra `kivi-serve serve` arguments).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
KIND ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=
SERVE_ARGS ?=

BIN := $(VENV)/bin

# vLLM on CPU: a KV-cache budget is mandatory (GiB), and the default thread binding runs the model
# on one core. One-process mode is the fastest way to start engines inside the test process.
# Each can be overridden from the environment.
CPU_ENV := VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
           VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-nobind}
TEST_ENV := $(CPU_ENV) VLLM_ENABLE_V1_MULTIPROCESSING=$${VLLM_ENABLE_V1_MULTIPROCESSING:-0}

.PHONY: help venv install model test serve lint

help:
	@echo "make serve   install, prepare the embedded model, serve it on http://127.0.0.1:8000"
	@echo "make test    install, prepare the embedded model, run the tests (PYTEST_ARGS=...)"
	@echo "make install | model | lint | venv      (KIND=$(KIND), venv $(VENV))"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip

venv: $(BIN)/python

install: venv
	PYTHON=$(BIN)/python bash deploy/install.sh $(KIND) --dev

model: install
	$(BIN)/kivi-serve model prepare

test: install model
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

serve: install model
	$(CPU_ENV) $(BIN)/kivi-serve serve $(SERVE_ARGS)

# ruff, then the deploy files' own linters (hadolint, docker-compose, kubernetes-validate; kubectl and
# promtool when installed): deploy/lint.sh says what it ran and what it skipped.
lint: install
	$(BIN)/ruff check kivi_serve tests deploy
	PATH="$(abspath $(BIN)):$$PATH" bash deploy/lint.sh
