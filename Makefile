# advexplain: `make up` installs, trains the default models if missing and serves both services;
# `make test` runs the whole suite. Everything lives in .venv.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODELS ?= models
THREADS ?= 2
export ADVEXPLAIN_THREADS ?= $(THREADS)

.PHONY: install models up test test-fast lint demo clean-models

install: $(STAMP) $(VENV)/mypy-path/advexplain/shared

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

# mypy checks the library as the package it installs as (advexplain.shared). The editable install maps
# shared/ there with an import hook mypy cannot follow, so mypy reads this link tree (pyproject's mypy_path).
$(VENV)/mypy-path/advexplain/shared: | $(STAMP)
	@mkdir -p $(VENV)/mypy-path/advexplain
	@ln -sfn $(CURDIR)/advexplain/__init__.py $(VENV)/mypy-path/advexplain/__init__.py
	@ln -sfn $(CURDIR)/shared $@

# Train the default (CPU-sized) models on the built-in elpv data only when they are missing. The
# elpv surrogate trains as the paper does (--no-augment): on elpv augmentation ties on average over
# draws and loses on this one (README, Training).
models: install $(MODELS)/blackbox/config.json $(MODELS)/surrogate/config.json

$(MODELS)/blackbox/config.json: | install
	$(BIN)/advexplain train blackbox --out $(MODELS)/blackbox

$(MODELS)/surrogate/config.json: | install
	$(BIN)/advexplain train surrogate --no-augment --out $(MODELS)/surrogate

# Serve both services on 127.0.0.1:8000 (black box) and :8001 (explainer); Ctrl-C stops both.
up: models
	$(BIN)/python -m advexplain.up --models $(MODELS)

# With `make up` running in another terminal: the batch evaluation through the real services.
demo: install
	$(BIN)/advexplain evaluate --data elpv --split validation --blackbox-url http://127.0.0.1:8000 \
	  --surrogate $(MODELS)/surrogate --mode blackbox --out reports/demo
	@echo "report: reports/demo/report.md"

# Lint and type-check first: both take seconds, the suite takes minutes.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not integration and not faces"

clean-models:
	rm -rf $(MODELS)/blackbox $(MODELS)/surrogate
