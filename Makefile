# The README's two commands: `make demo` (the main job on the embedded default) and `make test` (CI's gate).
# Both create the cached virtual environment on first use (tools/bootstrap.sh).
SHELL := /bin/bash
PY = $(shell tools/bootstrap.sh)
# OpenFHE and torch on a 2-core machine: one thread per process avoids 10x slow-downs from contention.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= passive

.PHONY: demo test fuzz lint format bench venv
venv:
	@tools/bootstrap.sh >/dev/null

demo:
	@py=$$(tools/bootstrap.sh) && $$py -m trustgrad demo

test:
	@py=$$(tools/bootstrap.sh) && $$py -m ruff check trustgrad tests benchmarks && $$py -m ruff format --check trustgrad tests benchmarks && $$py -m pytest -q

# The whole fuzz suite (tests/fuzz): every parser of bytes a peer or a file can send, FUZZ_CASES cases split over the
# targets, each in a sacrificial process under a memory limit and a timeout; prints the outcome table, exit 1 on any
# finding. `make test` runs a seeded subset.
FUZZ_CASES ?= 10000
fuzz:
	@py=$$(tools/bootstrap.sh) && $$py -m tests.fuzz --cases $(FUZZ_CASES) --json runs/fuzz-report.json

lint:
	@py=$$(tools/bootstrap.sh) && $$py -m ruff check trustgrad tests benchmarks

format:
	@py=$$(tools/bootstrap.sh) && $$py -m ruff format trustgrad tests benchmarks && $$py -m ruff check --fix trustgrad tests benchmarks
