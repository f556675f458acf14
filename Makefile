# Two entry points for a fresh machine:
#   make demo   set up .venv and train scVI on generated data (writes demo_output/, with UMAP plots)
#   make test   set up .venv, lint with ruff (config in pyproject.toml) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean strip-notebooks

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,sparse,plot,hvg]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/pyro-scvi demo --plots

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_cellbench.py

# notebooks are committed without outputs (tests/test_notebooks.py checks it)
strip-notebooks: setup
	$(BIN)/python notebooks/strip_outputs.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
