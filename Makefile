# kivi-serve: one-command install, test and serve.
#   make test    create/update .venv, install everything, prepare the embedded model, run pytest
#   make serve   same install, then serve the embedded model on http://127.0.0.1:8000
#   make gpu-check OUT=dir   on a machine with an NVIDIA GPU, torch and CuPy (no vLLM, no install):
#                the GPU kernel tests + the kernel benchmark at the bar's shapes, JSON + PNG into dir,
#                in at most 8 minutes (docs/performance.md). GPU_CHECK_ARGS=--dry-run: plan only.
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

.PHONY: help venv install model test serve lint gpu-check

help:
	@echo "make serve   install, prepare the embedded model, serve it on http://127.0.0.1:8000"
	@echo "make test    install, prepare the embedded model, run the tests (PYTEST_ARGS=...)"
	@echo "make install | model | lint | venv      (KIND=$(KIND), venv $(VENV))"
	@echo "make gpu-check OUT=dir   GPU kernel tests + kernel benchmark into dir (GPU machine, no vLLM)"

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

# No install step: a GPU loan is short. The checkout is put on PYTHONPATH; the interpreter is the
# venv's when there is one, else python3 (GPU_PYTHON=... to choose). The check bounds its own steps
# (480 s); `timeout` is the backstop.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "usage: make gpu-check OUT=dir [GPU_CHECK_ARGS=--dry-run]" >&2; exit 2; fi
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" timeout 540 $(GPU_PYTHON) scripts/gpu_check.py "$(OUT)" $(GPU_CHECK_ARGS)
