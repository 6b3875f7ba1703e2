# Two entry points (see README): `make demo` runs the main job, `make test` the whole suite (lint,
# type check, then the tests). Both create .venv and install what they need; the pinned CPU torch
# wheel goes in first so no dependency pulls a multi-GB CUDA build (override with
# `make TORCH_SPEC=torch==X.Y ...`), then the tested set of every other dependency
# (constraints.txt), so a fresh install resolves the same versions every time.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
OLDEST_LIGHTNING := pytorch-lightning==2.5.6
OLDEST_LIGHTNING_DIR := $(VENV)/overlays/pytorch-lightning-2.5
AZURITE_VERSION := 3.35.0

CONSTRAINTS := constraints.txt

.PHONY: demo test test-fast lint bench install services constraints clean

# What the demo needs: torch, the package and matplotlib for its plot (about 1 GB less than the
# test toolchain below: no Lightning, emulators, linters or Azurite).
$(RUNTIME): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[report]"
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	# The oldest supported Lightning, beside the newest: a PYTHONPATH overlay the tests put first
	# (with lightning hidden), so one environment tests both releases.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(OLDEST_LIGHTNING_DIR) "$(OLDEST_LIGHTNING)"
	# Azurite (Azure Blob Storage emulator, from npm) for the object-store tests.
	if command -v npm >/dev/null 2>&1; then npm install -s --no-audit --no-fund --prefix $(VENV)/node "azurite@$(AZURITE_VERSION)"; \
	else echo "make: npm not found; the Azure tests will be skipped" >&2; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/python launch/demo.py

# Slurm and munge, iptables and etcd for the integration tests (Debian packages; the tests start
# the daemons).
services:
	sh scripts/install-services.sh

# The linter and the type checker first (configured in pyproject.toml): they take seconds and a
# failure there fails the test command.
lint: $(STAMP)
	$(BIN)/ruff check elastic_resume tests benchmarks launch harness
	$(BIN)/mypy

test: $(STAMP) services lint
	$(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

# Re-pin the tested set after changing dependencies in pyproject.toml (torch is pinned by TORCH_SPEC).
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|elastic-resume)==' > $(CONSTRAINTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_objectstore_memory.py
	$(BIN)/python benchmarks/bench_integrity.py
	$(BIN)/python benchmarks/bench_manager.py
	$(BIN)/python benchmarks/bench_guard.py
	$(BIN)/python benchmarks/bench_false_rollbacks.py
	$(BIN)/python benchmarks/bench_launcher.py
	$(BIN)/python benchmarks/bench_lightning.py
	$(BIN)/python benchmarks/bench_hangs.py
	$(BIN)/python benchmarks/bench_health_checks.py
	$(BIN)/python benchmarks/bench_slurm_preemption.py  # root and Slurm (make services); says "skipped" otherwise

clean:
	rm -rf $(VENV) demo-run .bench .pytest_cache .mypy_cache .ruff_cache elastic-resume-logs
