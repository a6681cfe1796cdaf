# Set-up and entry points. `make demo` and `make test` are the two commands in the README.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-ema test test-fast lint bench clean

install: $(STAMP)

# Re-install when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip<26.2"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# ruff, then the layers and "no cycles" contracts in pyproject.toml (import-linter; docs/architecture.md)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Two pytest workers (pytest-xdist), each test file whole on one worker; TEST_WORKERS=0 runs them in this process.
# The suite's durations, one worker against two: benchmarks/suite_durations.md.
TEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m launch.demo

# the second demo: train once keeping post-hoc EMAs, then FID against the EMA length (README)
demo-ema: install
	$(PY) -m launch.demo --ema-sweep

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
