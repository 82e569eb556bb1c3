# nbcluster: `make up` starts the platform on this machine; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed in $(VENV), as stamp files (each redone when pyproject.toml changes):
#   .installed-run  what `make up` needs: nbcluster, JupyterLab and the data-science stack the
#                   kernels import (the `lab` and `datascience` extras; README, "Install")
#   .installed      that and the test tools of `make test` (the `dev` extra: torch, mypy,
#                   moto, JupyterHub ...); a dev install is a run install too
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
RUN_EXTRAS := lab,datascience

.PHONY: up test lint typecheck unit bench clean image

$(BIN)/python:
	@echo "Creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip's own output (no --quiet) is the progress: the first install downloads a few hundred MB.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "Installing nbcluster, JupyterLab, numpy, pandas, matplotlib, scipy and scikit-learn"
	@echo "into $(VENV): a few minutes the first time, seconds after that."
	$(BIN)/python -m pip install -e '.[$(RUN_EXTRAS)]'
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "Installing nbcluster with the test tools (the dev extra: torch, mypy, moto,"
	@echo "JupyterHub ...) into $(VENV): several minutes the first time, seconds after that."
	$(BIN)/python -m pip install --quiet -e '.[dev,$(RUN_EXTRAS)]'
	touch $@ $(RUN_STAMP)

up: $(RUN_STAMP)
	$(BIN)/nbcluster up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (pytest-xdist): see pyproject.toml. `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2
test: lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

# The nbcluster image, nbcluster:<version> and nbcluster:latest (deploy/docker/README.md); on a
# machine without a registry: deploy/docker/build-base.sh, then `make image
# BASE=nbcluster-base:bookworm`.
BASE ?= python:3.11-slim
# The common data-science stack, so that notebooks of kernels in the image can plot.
EXTRAS ?= datascience
image:
	bash deploy/docker/build-image.sh --base $(BASE) --extras "$(EXTRAS)"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_execute.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
