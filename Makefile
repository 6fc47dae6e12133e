# One entry for set-up, tests and the main job. `make test` works on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps python-deps test run bench-transport bench-env bench-policy clean

install: system-deps python-deps

# Vulkan through Mesa >= 23 lavapipe (bookworm's 22.3 is rejected by SAPIEN) and FFmpeg shared
# libraries for torchcodec. Idempotent: skips what is already there.
system-deps:
	@bash scripts/install_system_deps.sh

python-deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

test: install
	$(PY) -m pytest -q tests

# The main job: demos -> Stage I SFT -> Stage II co-training (learner + actors) -> report.
run: install
	$(VENV)/bin/tandem-pipeline $(ARGS)

bench-transport: install
	$(PY) -m benchmarks.bench_transport

bench-env: install
	$(PY) -m benchmarks.bench_env

bench-policy: install
	$(PY) -m benchmarks.bench_policy --preset tiny --device cpu --threads 1
	$(PY) -m benchmarks.bench_policy --preset base --device cpu --threads 1

clean:
	rm -rf $(VENV) .pytest_cache
