# The two commands of the README: `make demo` runs the whole DAG on the demo config, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint bench clean

demo: $(VENV)/.installed
	snakemake --profile cluster/local

# Two workers, one test file at a time each: the SLURM tests (mostly waiting on the test cluster) run
# beside the others; tests/conftest.py starts the two longest files first, one per worker.
test: $(VENV)/.installed-test
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# CPU-side figures as one ratio table (training loop, sampler, data), under 5 minutes on 2 cores.
bench: $(VENV)/.installed
	OMP_NUM_THREADS=1 python benchmarks/run_all.py

lint: $(VENV)/.installed-test
	ruff check .
	ruff format --check .
	snakefmt --check workflow
	snakemake --lint --dry-run > /dev/null

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf results resources logs .snakemake report.html
