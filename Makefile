# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labkit-installed
# A CPU build of torch on CI; a bare `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint bench device-check device-wheels clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: venv
	$(BIN)/python -m labkit.study

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check labkit tests bench

bench: venv
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/gpu_sft.py --dry-run   # on a CUDA machine: --preset 1b (see its --help)
	$(BIN)/python bench/data_memory.py
	$(BIN)/python bench/labels.py
	$(BIN)/python -m bench.runs_table

# On a lent GPU machine (bench/device_check.sh says what it runs; results in $$OUT or bench/results/device).
device-check:
	bash bench/device_check.sh

# Here, before a device session: the wheels its image lacks, into .devwheels/ (carried to the device).
device-wheels: venv
	PYTHON=$(BIN)/python bash bench/device_wheels.sh

clean:
	rm -rf $(VENV) .labkit runs
