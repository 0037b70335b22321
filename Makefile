# The targets people and CI both call. `make test` and `make serve` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ENGINE_URL ?= $(or $(STRATA_ENGINE_URL),http://127.0.0.1:8000)
PYTEST_ARGS ?=

.PHONY: help venv test lint format serve serve-fake bench-hit clean

help:
	@echo "make serve       Redis + gateway in front of the engine at ENGINE_URL ($(ENGINE_URL))"
	@echo "make serve-fake  Redis + gateway in front of the built-in fake engine (no model needed)"
	@echo "make test        install what the suite needs, then run the whole suite"
	@echo "make lint        ruff + mypy --strict"
	@echo "make bench-hit   hit-path benchmark (bare Starlette vs L1 vs L2), writes docs/benchmarks.md"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	./scripts/ensure-apt.sh docker-compose:docker-compose
	./scripts/ensure-redis.sh
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
	@$(BIN)/python -c "import httpx,sys; httpx.get('$(ENGINE_URL)/v1/models', timeout=3)" 2>/dev/null \
	  || { echo "make serve: no OpenAI-compatible engine answers at $(ENGINE_URL)."; \
	       echo "  Start vLLM there, set ENGINE_URL=..., or try 'make serve-fake'."; exit 1; }
	$(BIN)/strata serve --engine-url $(ENGINE_URL)

serve-fake: $(STAMP)
	./scripts/ensure-redis.sh
	$(BIN)/python -m engine.fake --port 9000 --answer-bytes 1000 & \
	  trap "kill $$! 2>/dev/null" EXIT; \
	  $(BIN)/strata serve --engine-url http://127.0.0.1:9000

bench-hit: $(STAMP)
	./scripts/ensure-redis.sh
	./scripts/ensure-apt.sh wrk:wrk
	$(BIN)/python -m bench.hit_path --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
