# One-command set-up and runs on a fresh machine: `make test`, `make demo`.
# Override the torch build, e.g. `make test TORCH_SPEC="torch torchvision"` or a CPU/CUDA index of your choice.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint format bench clean

install: $(STAMP)

# torch/torchvision first (a bare `torch` requirement would otherwise pull another multi-GB build), then the package
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py --output_dir outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests examples benchmarks
	$(BIN)/ruff format src tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/routing_overhead.py

clean:
	rm -rf $(VENV) outputs build *.egg-info src/*.egg-info
