# The README's two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run stop test bench lint clean install server-deps docs docs-build docs-gen

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]} at {sys.executable}"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	@# PYTHONWARNINGS: setuptools' build backend prints a boxed notice about editable installs that asks nothing of us
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,docs]'
	$(BIN)/python -m pip check
	@touch $@

# The server tier's Python packages (a Milvus server run from Python, Feast's Redis client); redis-server is a
# system package (`apt-get install redis-server`). `make test` runs the tier when both are present, else skips it.
server-deps: $(STAMP)
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,docs,server]'
	$(BIN)/python -m pip check

# The main job on the embedded synthetic data: generate → contracts → dbt → Feast apply/materialize → training set
# → train → publish a release (Milvus collection + user tower) → start the service in the background, once ready.
run: $(STAMP)
	$(BIN)/retrieval run
	$(BIN)/retrieval-service start

stop: $(STAMP)
	$(BIN)/retrieval-service stop

test: $(STAMP)
	$(BIN)/python -m pytest -m "not bench" -q --durations=10

# Every benchmark the documentation renders (docs/results/*.json), one after another; then `make docs-gen`.
# About four hours on 2 cores; each script runs alone too (docs/how-to/run-benchmarks.md).
bench: $(STAMP)
	$(BIN)/python bench/bench_model.py --dataset synthetic
	$(BIN)/python bench/bench_model.py --dataset ml100k
	$(BIN)/python bench/bench_model.py --dataset synthetic-medium --seeds 1
	$(BIN)/python bench/bench_data.py --events 2000000 --users 40000 --pins 20000 --data-dir .data/bench_data_2m \
	  --out docs/results/data-2m.json
	$(BIN)/python bench/bench_data.py --data-dir .data/bench_data_10m --out docs/results/data-10m.json
	$(BIN)/python bench/bench_scale.py --sizes S M --set train.threads=2
	$(BIN)/python bench/bench_index.py
	$(BIN)/retrieval run
	$(BIN)/python bench/bench_service.py
	$(BIN)/python bench/bench_retrain.py
	$(MAKE) docs-gen

# The documentation site (mkdocs.yml, docs/): served with live reload, built strictly, generated pages rewritten.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-gen: $(STAMP)
	$(BIN)/python docs/generate.py

# The retrieval service as a bento in $(DATA)/bentoml (containerize: docs/how-to/container.md).
# BentoML 1.4 looks up a `uv` even with lock_packages: false and pip-installs one into the venv when none is on
# PATH; a stub that fails instead keeps .venv as installed (it is never called unless locking is turned on).
DATA ?= .data
.PHONY: bento
bento: $(STAMP)
	@stub=$$(mktemp -d) && trap 'rm -rf "$$stub"' EXIT && \
	if ! command -v uv >/dev/null; then \
	  printf '#!/bin/sh\necho "uv: not installed; bentos/bentofile.yaml builds without it (lock_packages: false)" >&2\nexit 1\n' > "$$stub/uv" && \
	  chmod +x "$$stub/uv"; \
	fi && \
	PATH="$$stub:$$PATH" BENTOML_HOME=$(DATA)/bentoml $(BIN)/bentoml build -f bentos/bentofile.yaml .

# The bento's image built and run for real (docs/how-to/container.md): docker build, run with a copy of a data dir at
# /data, /readyz, a learned and a cold-start request, non-root, stop. Not part of `make test`: needs Docker and the
# network. It serves a copy of the release `make run` left in .data; without one (or CT_DATA=DIR without one) it first
# runs the whole pipeline into .data/container-test (several minutes).
.PHONY: container-test
container-test: bento
	BENTOML_HOME=$(DATA)/bentoml BIN=$(BIN) bash bentos/container_test.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	-[ -x $(BIN)/retrieval-service ] && $(BIN)/retrieval-service stop
	rm -rf .data dbt_project/target dbt_project/logs .pytest_cache
