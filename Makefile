# The README's two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]} at {sys.executable}"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	@touch $@

# Runs every stage on the embedded synthetic data (generate → contracts → dbt → Feast apply/materialize → training set).
run: $(STAMP)
	$(BIN)/retrieval run

test: $(STAMP)
	$(BIN)/python -m pytest -m "not bench" -q

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_baselines.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .data dbt_project/target dbt_project/logs .pytest_cache
