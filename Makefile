# The targets people and CI both call. `make test` and `make serve` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# Empty: `make serve` launches vLLM itself. Set it to use an engine that is already running.
ENGINE_URL ?= $(STRATA_ENGINE_URL)
ENGINE_VENV ?= .venv-engine
DATA_DIR ?= $(or $(STRATA_DATA_DIR),$(CURDIR)/.run)
PYTEST_ARGS ?=

.PHONY: help venv engine test lint format serve serve-fake bench bench-hit bench-stream bench-client bench-routing clean

help:
	@echo "make serve       Redis + vLLM (CPU unless a GPU is found) with the default model + gateway"
	@echo "                 (ENGINE_URL=http://... uses a running engine instead of launching one)"
	@echo "make serve-fake  Redis + gateway in front of the built-in fake engine (no model needed)"
	@echo "make test        install what the suite needs, then run the whole suite"
	@echo "make lint        ruff + mypy --strict"
	@echo "make bench       every benchmark side by side (hit path, miss overhead, LiteLLM, vLLM end"
	@echo "                 to end); rewrites docs/benchmarks.md and its plots (~25 min on 2 CPUs)"
	@echo "                 (SECTIONS=hit,miss,e2e picks sections; QUICK=1 is a smoke test)"
	@echo "make bench-hit   the hit-path section alone (= make bench SECTIONS=hit)"
	@echo "make bench-stream  streaming TTFB (gateway vs engine) and replay rate, printed"
	@echo "make bench-client  CPU per streamed engine call: httpx vs httpcore vs engine.http11"
	@echo "make bench-routing two vLLM CPU replicas: prefix routing vs round robin, one killed"
	@echo "                 under load (~15 min); writes bench/results/prefix_routing.json"

# The CPU build of torch goes first (a local wheel on these machines): otherwise the semantic
# extra's sentence-transformers would pull the CUDA build and its several GB of packages.
TORCH_SPEC ?= torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet -e '.[dev,semantic]'
	touch $@

venv: $(STAMP)

engine:
	./scripts/install-engine.sh $(ENGINE_VENV)

test: $(STAMP) engine
	./scripts/ensure-apt.sh docker-compose:docker-compose promtool:prometheus npm:npm
	./scripts/ensure-helm.sh $(BIN)
	./scripts/ensure-redis.sh
	STRATA_TEST_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python STRATA_TEST_DATA_DIR=$(DATA_DIR) \
	  $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: $(STAMP)
	./scripts/ensure-redis.sh
ifeq ($(ENGINE_URL),)
	./scripts/install-engine.sh $(ENGINE_VENV)
	STRATA_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python STRATA_DATA_DIR=$(DATA_DIR) \
	  $(BIN)/strata serve
else
	$(BIN)/strata serve --engine-url $(ENGINE_URL)
endif

serve-fake: $(STAMP)
	./scripts/ensure-redis.sh
	$(BIN)/python -m engine.fake --port 9000 --answer-bytes 1000 & \
	  trap "kill $$! 2>/dev/null" EXIT; \
	  $(BIN)/strata serve --engine-url http://127.0.0.1:9000

SECTIONS ?=
QUICK ?=

# The vLLM engine is installed only when the end-to-end section runs; LiteLLM installs itself
# (pinned) into .bench/litellm-venv the first time.
bench: $(STAMP)
	./scripts/ensure-redis.sh
	./scripts/ensure-apt.sh wrk:wrk
	if [ -z "$(SECTIONS)" ] || [[ "$(SECTIONS)" == *e2e* ]]; then \
	  ./scripts/install-engine.sh $(ENGINE_VENV); fi
	STRATA_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python STRATA_DATA_DIR=$(DATA_DIR) \
	  $(BIN)/python -m bench.all $(if $(SECTIONS),--sections $(SECTIONS)) $(if $(QUICK),--quick)

bench-hit:
	$(MAKE) bench SECTIONS=hit

bench-stream: $(STAMP)
	$(BIN)/python -m bench.stream_ttfb

bench-client: $(STAMP)
	$(BIN)/python -m bench.engine_client

bench-routing: $(STAMP) engine
	STRATA_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python STRATA_DATA_DIR=$(DATA_DIR) \
	  nice -n 10 $(BIN)/python -m bench.prefix_routing

clean:
	rm -rf $(VENV) $(ENGINE_VENV) .run .pytest_cache .mypy_cache .ruff_cache
