# The README's two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run stop test bench lint clean install server-deps

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]} at {sys.executable}"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	@touch $@

# The server tier's Python packages (a Milvus server run from Python, Feast's Redis client); redis-server is a
# system package (`apt-get install redis-server`). `make test` runs the tier when both are present, else skips it.
server-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,server]'
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

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_baselines.py
	$(BIN)/python bench/bench_index.py
	$(BIN)/python bench/bench_service.py

# The retrieval service as a bento in $(DATA)/bentoml (containerize: see README "Ship it as a container").
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

# The bento's image built and run for real (bentos/CONTAINER.md): docker build, run with a copy of $(CT_DATA) at /data,
# /readyz, a learned and a cold-start request, non-root, stop. Not part of `make test`: needs Docker and the network.
# CT_DATA is made by `retrieval run --data_dir $(CT_DATA)` when it holds no release.
CT_DATA ?= $(DATA)/container-test
.PHONY: container-test
container-test: bento
	BENTOML_HOME=$(DATA)/bentoml CT_DATA=$(CT_DATA) BIN=$(BIN) bash bentos/container_test.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	-[ -x $(BIN)/retrieval-service ] && $(BIN)/retrieval-service stop
	rm -rf .data dbt_project/target dbt_project/logs .pytest_cache
