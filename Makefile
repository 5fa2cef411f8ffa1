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
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.cfg
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/cai pipeline --config configs/pipeline/tiny.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
