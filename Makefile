# The README's two commands. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
# torch is pinned in the same pip command so the CPU wheel is taken, never a CUDA build.
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cu128"`
# (or install CUDA torch into .venv first and pass TORCH_SPEC=torch); the README says the same.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC) -e ".[dev]"

serve: install
	$(BIN)/vopd serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Everyday work on two cores: the library and the front end's callbacks, no services, no browser (a few minutes).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not services and not browser" --ignore=tests/service

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
