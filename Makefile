# Thin wrapper over the venv and pytest. Every target that needs the environment creates it
# idempotently (a venv in the checkout, refreshed when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest-xdist workers, one test file per unit of work (module fixtures computed once; the files that
# share the CI regress run are one unit: see conftest.py). Run alone, a test session keeps about one core busy.
XDIST_ARGS ?= -n 2 --dist loadfile
# Tiers CI runs: everything that needs no optional download or extra package.
TEST_MARKERS ?= not real and not interop and not slow
REGRESS_OUT ?= runs/regress
REGRESS_ARGS ?= --jobs 2

.PHONY: setup run test regress bench golden-update lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plots,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in default, then the headline of the last regress report (`make regress`).
run: $(STAMP)
	$(BIN)/seeddelta demo
	$(BIN)/seeddelta regress --show --out $(REGRESS_OUT)

# The gate is deterministic: hypothesis draws the same examples every run (profile "ci");
# `make regress` keeps exploring new ones (profile "dev", or HYPOTHESIS_PROFILE=nightly).
test: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -m "$(TEST_MARKERS)" $(XDIST_ARGS) $(PYTEST_ARGS)

# The gate before merging: `seeddelta regress` on the tiny model (the v1 criteria every shipped preset
# declares, B1-B5, the equal-bytes comparison; report in $(REGRESS_OUT)/report.md; exit 1 when a declared
# criterion or figure fails), then the tests that judge it (golden report snapshots, the presets at CI
# settings) and the toy tier with hypothesis exploring new examples (profile "dev"). The tiny tier's
# other tests are `make test`'s (CI gates every merge on them); the opt-in tiers: pytest -m real / interop.
REGRESS_TESTS ?= tests/toy tests/golden tests/tiny/test_regress.py
regress: $(STAMP)
	$(BIN)/seeddelta regress --out $(REGRESS_OUT) $(REGRESS_ARGS)
	$(BIN)/python -m pytest $(XDIST_ARGS) $(REGRESS_TESTS) $(PYTEST_ARGS)

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
