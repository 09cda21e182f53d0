# One command per chore. CI runs `make test`, exactly as the README shows.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SF := $(VENV)/bin/sandfleet
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench venv engine images native test-deps clean

setup: venv engine images native

venv: $(STAMP)

# Re-install only when the project's metadata changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "setup: installing sandfleet (editable, dev extras) into $(VENV)"
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The C helpers: the ledger's batch SHA-256 (accounting/native/sha256.c) and the
# command readers: eBPF (sandbox/native/ebpfmon*.c: clang, libbpf) and the connector's
# (sandbox/native/procmon.c). Installs the toolchain when a part is missing (Debian,
# as root); without it the next reader / the Python paths run, slower.
NATIVE_PACKAGES := gcc clang libbpf-dev libelf-dev zlib1g-dev
native: venv
	@if ! command -v cc >/dev/null || ! command -v clang >/dev/null \
		|| [ ! -e /usr/include/bpf/libbpf.h ]; then \
		echo "setup: apt-get install $(NATIVE_PACKAGES) (native helpers, eBPF reader)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq $(NATIVE_PACKAGES) >/dev/null \
			|| echo "setup: could not install the toolchain; slower readers will run"; \
	fi
	@$(PY) -m accounting.native
	@$(PY) -m sandbox.native

engine: venv
	@$(SF) engine ensure

images: venv engine
	@$(SF) images build

# The demo: agents fix real bugs in four small repositories, each task in its own
# sandbox, every LLM call (the offline `scripted` model) metered into the ledger; then
# the cost report, the anomalies and the audit. Each run is a new batch (--again); the
# ledger keeps them all. Some tasks fail on purpose (see configs/batches/demo.yaml), so
# `sandfleet run` exits 1 and the demo carries on.
DEMO_DATA ?= sandfleet-data
demo: setup
	@$(PY) -m scheduler.demo_repos
	@$(SF) run configs/batches/demo.yaml --again --data-dir $(DEMO_DATA) || test $$? -eq 1
	@$(SF) run configs/batches/demo-research.yaml --again --data-dir $(DEMO_DATA) || test $$? -eq 1
	@echo; echo "== sandfleet report cost --by team,task_type,model"
	@$(SF) report cost --by team,task_type,model --data-dir $(DEMO_DATA)
	@echo; echo "== sandfleet anomalies"
	@$(SF) anomalies --data-dir $(DEMO_DATA)
	@echo; echo "== sandfleet audit verify"
	@$(SF) audit verify --data-dir $(DEMO_DATA)

# Engines the tests start themselves: a real Prometheus and a headless Chromium.
TEST_PACKAGES := prometheus chromium
test-deps:
	@missing=""; for p in $(TEST_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "setup: apt-get install$$missing (test engines)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	fi

test: setup test-deps
	@$(VENV)/bin/pytest tests/ $(PYTEST_ARGS)

lint: venv
	@$(VENV)/bin/ruff check scheduler sandbox accounting tests bench
	@$(VENV)/bin/ruff format --check scheduler sandbox accounting tests bench
	@$(VENV)/bin/mypy scheduler sandbox accounting

bench: setup
	@# -P: a bench named like a package (bench/scheduler.py) must not shadow it
	@for b in bench/*.py; do echo "== $$b"; $(PY) -P $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) sandfleet-data .pytest_cache
