# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Each creates .venv on first use, installing the CPU build of torch first (an unpinned torch
# would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
PRESET ?= default
ARGS ?=
# Test files run on this many pytest-xdist workers, a file's tests on one worker (their module
# fixtures are whole runs); 0 runs them in this process (benchmarks/RESULTS.md, "The test suite").
TEST_WORKERS ?= 2

# Prefect state stays inside the project and never phones home.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
# Idle OpenMP threads sleep rather than spin (git show 8338f62:benchmarks/RESULTS.md, "Threads": spinning cost 3.4x on shared cores).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: bench test quick install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[test,dask,tracking]"
	touch $@

install: $(BIN)/.installed

bench: $(BIN)/.installed
	$(BIN)/dpo-bench run --preset $(PRESET) $(ARGS)

quick: $(BIN)/.installed
	$(BIN)/dpo-bench run --preset quick $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV) .prefect .pytest_cache .hypothesis
