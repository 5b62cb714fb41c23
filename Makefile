# fleet: ops and developer entry points. Every target sets itself up (virtualenv, install).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
CONFIG ?= infra/fleet.toml
TORCH_VERSION ?= 2.13.0

.DEFAULT_GOAL := help
.PHONY: help install lint format typecheck test test-unit test-integration test-faults check demo bench worker status catalog route workflow dlq api-server autoscale plan scale drain simulate trace flower exporter config-check clean gpu-check gpu-carry gpu-annotate gpu-rehearse models

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)  # the CPU build; any other pulls CUDA wheels
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create the virtualenv and install fleet with its dev tools

lint: $(STAMP) ## ruff (lint and format check)
	$(BIN)/ruff check fleet workers tests bench
	$(BIN)/ruff format --check fleet workers tests bench

format: $(STAMP) ## Apply ruff's formatter and safe fixes
	$(BIN)/ruff format fleet workers tests bench
	$(BIN)/ruff check --fix fleet workers tests bench

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy fleet workers

test: $(STAMP) ## All tests: unit, then integration on real Redis, RabbitMQ and worker processes
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## Unit tests only (no broker needed)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## Integration tests only
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-faults: $(STAMP) ## The fault and security suite (pytest -m fault): prints faults injected and tasks lost
	FLEET_FAULT_SUMMARY=bench/results/faults.json $(BIN)/pytest -m fault $(PYTEST_ARGS)

check: lint typecheck test ## The gate: lint, types and tests

demo: $(STAMP) ## End-to-end demo on a throwaway Redis with emulated workers
	$(BIN)/fleet demo

bench: $(STAMP) ## Benchmarks: submit, bulk submit, worker, engines through a worker vs direct, traces vs baselines and bounds, simulator speed, Mélange reproduction
	$(BIN)/python -m bench.run

worker: $(STAMP) ## Run a worker: make worker ACCELERATOR=nvidia-l4 (default auto)
	$(BIN)/fleet worker --accelerator $(or $(ACCELERATOR),auto)

status: $(STAMP) ## Queue depths and live workers on FLEET_BROKER_URL
	$(BIN)/fleet status

catalog: $(STAMP) ## Accelerators and priced offers
	$(BIN)/fleet catalog

route: $(STAMP) ## Where a spec would run: make route SPEC=examples/llama-8b-chat.json
	$(BIN)/fleet route $(SPEC)

workflow: $(STAMP) ## Run a workflow and wait: make workflow WORKFLOW=examples/review-workflow.yaml [WAIT=120]; DRY=1 only places its steps
	$(if $(DRY),$(BIN)/fleet route --workflow $(WORKFLOW),$(BIN)/fleet submit --workflow $(WORKFLOW) --wait $(or $(WAIT),120))

dlq: $(STAMP) ## Dead-lettered tasks: make dlq [ID=task-id] (fleet dlq requeue ID to resubmit)
	$(BIN)/fleet dlq $(if $(ID),show $(ID),list)

api-server: $(STAMP) ## An EMULATED OpenAI-compatible endpoint for trying API workers: make api-server [PORT=8099]
	$(BIN)/python -m fleet.emulated.openai_server --port $(or $(PORT),8099)

autoscale: $(STAMP) ## Run the autoscaler on CONFIG (default infra/fleet.toml); ONCE=1 for one pass, DRY=1 to change nothing
	$(BIN)/fleet autoscale --config $(CONFIG) $(if $(ONCE),--once) $(if $(DRY),--dry-run)

plan: $(STAMP) ## The autoscaler's decision table now: make plan [CONFIG=...] [SNAPSHOT=file.json]
	$(BIN)/fleet plan --config $(CONFIG) $(if $(SNAPSHOT),--snapshot $(SNAPSHOT))

scale: $(STAMP) ## Set a pool's size now: make scale POOL=local-l4 N=2
	$(BIN)/fleet scale $(POOL) $(N) --config $(CONFIG)

drain: $(STAMP) ## Drain a pool or a worker: make drain TARGET=local-l4 (or a worker's node name)
	$(BIN)/fleet drain $(TARGET) --config $(CONFIG)

simulate: $(STAMP) ## Replay a trace: make simulate TRACE=t.jsonl [POLICY=fleet|homogeneous|cheapest] [CONFIG=...]
	$(BIN)/fleet simulate --trace $(TRACE) --config $(CONFIG) --policy $(or $(POLICY),fleet)

trace: $(STAMP) ## Generate a trace: make trace KIND=multi-agent N=2000 OUT=t.jsonl [SEED=1]
	$(BIN)/python -m fleet.sim.generators $(KIND) --n $(N) --seed $(or $(SEED),1) --out $(OUT)

flower: $(STAMP) ## Flower on FLEET_BROKER_URL at http://127.0.0.1:5555; ADDRESS=0.0.0.0 needs FLOWER_BASIC_AUTH=user:pass
	$(BIN)/python -m fleet.obs.flower --address $(or $(ADDRESS),127.0.0.1) --port $(or $(PORT),5555)

exporter: $(STAMP) ## Prometheus metrics for FLEET_BROKER_URL on http://127.0.0.1:9808/metrics
	$(BIN)/fleet exporter

gpu-check: ## GPU check on a lent NVIDIA machine, with that machine's python: make gpu-check [OUT=...] [GPU_PYTHON=python3]
	$(or $(GPU_PYTHON),python3) bench/gpu_check.py --out $(or $(OUT),bench/results/gpu_check.json)

gpu-carry: $(STAMP) ## Write .gpu-carry/minilm-fp16 (46 MB fp16 MiniLM) for a lent machine; carry .gpu-carry
	$(BIN)/python bench/gpu_check.py --export-minilm-fp16 .gpu-carry/minilm-fp16

gpu-annotate: $(STAMP) ## Add fleet's throughput predictions to a GPU check report: make gpu-annotate FILE=...
	$(BIN)/python bench/gpu_check.py --annotate $(FILE)

gpu-rehearse: $(STAMP) ## The GPU check's code paths on this CPU (toy shapes; no GPU figure)
	$(BIN)/python bench/gpu_check.py --device cpu --small --out bench/results/gpu_check_rehearsal.json

models: $(STAMP) ## The model registry: make models [CONFIG=...]; fleet models show|verify|build for more
	$(BIN)/fleet models list --config $(CONFIG)

config-check: $(STAMP) ## Validate CONFIG
	$(BIN)/fleet config check $(CONFIG)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .fleet *.egg-info
