# `make demo` and `make test` work on a fresh clone: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench check-stack clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,local]'
	touch $(STAMP)

# Train logistic regression on a9a with 4 workers through the local runtime.
demo: $(STAMP)
	$(BIN)/baton run examples/a9a.json --fresh --import examples/data/a9a:datasets/a9a

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# Static checks: pyflakes and bugbear through ruff, then the type checker mypy on the
# folders its settings list (both configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check shared functions scripts bench tests
	$(BIN)/mypy

# Measure speed and memory; rewrites docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py

# Package the stack offline, lint and scan the template, and rehearse a deploy into moto
# (needs Node.js and npm).
check-stack:
	bash scripts/check-stack.sh

clean:
	rm -rf $(VENV) .baton .serverless .mypy_cache
