# Thin wrapper over the venv and pytest. Every target that needs the environment creates it
# idempotently (a venv in the checkout, refreshed when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Tiers CI runs: everything that needs no optional download or extra package.
TEST_MARKERS ?= not real and not interop and not slow

.PHONY: setup run test regress bench golden-update lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plots,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in default.
run: $(STAMP)
	$(BIN)/seeddelta demo

# The gate is deterministic: hypothesis draws the same examples every run (profile "ci");
# `make regress` keeps exploring new ones (profile "dev", or HYPOTHESIS_PROFILE=nightly).
test: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -m "$(TEST_MARKERS)" $(PYTEST_ARGS)

regress: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(PYTEST_ARGS)

golden-update: $(STAMP)
	$(BIN)/python -m pytest -m golden --snapshot-update $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check seeddelta tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy seeddelta

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
