# One command per chore. CI runs `make test`, exactly as the README shows.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SF := $(VENV)/bin/sandfleet
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench venv engine images test-deps clean

setup: venv engine images

venv: $(STAMP)

# Re-install only when the project's metadata changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "setup: installing sandfleet (editable, dev extras) into $(VENV)"
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

engine: venv
	@$(SF) engine ensure

images: venv engine
	@$(SF) images build

# Until the demo batch lands (issue 7): one real task in a `python` sandbox, then its
# collected diff and archive.
DEMO_TASK := textstats-$(shell date +%Y%m%dT%H%M%S)
demo: setup
	@echo "== sandfleet sandbox run --template python --repo configs/demo/textstats"
	@$(SF) sandbox run --template python --repo configs/demo/textstats \
		--batch demo --task $(DEMO_TASK) -- sh -c "$$(cat configs/demo/fix-textstats.sh)"
	@echo "== archive: sandfleet-data/archive/demo/$(DEMO_TASK)/1"
	@ls -l sandfleet-data/archive/demo/$(DEMO_TASK)/1
	@echo "== diff.patch"
	@cat sandfleet-data/archive/demo/$(DEMO_TASK)/1/diff.patch

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
