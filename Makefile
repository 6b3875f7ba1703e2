# Two entry points (see README): `make demo` runs the main job, `make test` the whole suite.
# Both create .venv and install what they need; the pinned CPU torch wheel goes in first so no
# dependency pulls a multi-GB CUDA build. Override with `make TORCH_SPEC=torch==X.Y ...`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OLDEST_LIGHTNING := pytorch-lightning==2.5.6
OLDEST_LIGHTNING_DIR := $(VENV)/overlays/pytorch-lightning-2.5
AZURITE_VERSION := 3.35.0

.PHONY: demo test test-fast bench install services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The oldest supported Lightning, beside the newest: a PYTHONPATH overlay the tests put first
	# (with lightning hidden), so one environment tests both releases.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(OLDEST_LIGHTNING_DIR) "$(OLDEST_LIGHTNING)"
	# Azurite (Azure Blob Storage emulator, from npm) for the object-store tests.
	if command -v npm >/dev/null 2>&1; then npm install -s --no-audit --no-fund --prefix $(VENV)/node "azurite@$(AZURITE_VERSION)"; \
	else echo "make: npm not found; the Azure tests will be skipped" >&2; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/demo.py

# Slurm and munge for the real-Slurm test (Debian packages; the tests start the daemons).
services:
	sh scripts/install-services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_integrity.py
	$(BIN)/python benchmarks/bench_manager.py
	$(BIN)/python benchmarks/bench_guard.py
	$(BIN)/python benchmarks/bench_launcher.py
	$(BIN)/python benchmarks/bench_lightning.py

clean:
	rm -rf $(VENV) demo-run .bench .pytest_cache elastic-resume-logs
