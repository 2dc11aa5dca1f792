# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project with what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv lint test demo bench clean

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
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

## The main job: worker-a and worker-b, the dispatched example tests, summary and JSON report.
demo: venv
	$(BIN)/python scripts/demo.py

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
