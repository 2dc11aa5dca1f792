# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project with what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv lint test demo bench image image-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The whole suite: lint, types, unit tests and end-to-end tests (real RabbitMQ, real workers).
test: lint
	@scripts/ensure_chromium.sh
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

## The main job: worker-a and worker-b, the dispatched example tests, summary and JSON report.
demo: venv
	$(BIN)/python scripts/demo.py

## The worker image from workers/Dockerfile, built as `docker compose build` does, with buildah
## (no Docker engine); the first build makes a stand-in python:3.11-slim base (~3 min), cached.
image: venv
	$(BIN)/python scripts/worker_image.py build

## That image built and its worker-a / worker-b containers run the example tests (buildah, root).
image-test: venv
	$(BIN)/python -m pytest tests/e2e/test_image.py -v $(PYTEST_ARGS)

## Local pytest vs pytest-xdist vs --celery-dispatch on generated workloads (bench/README.md).
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output bench/work .pytest_cache .mypy_cache .ruff_cache *.egg-info
