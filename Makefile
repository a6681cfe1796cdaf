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

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m pipeline.demo

# the second demo: train once keeping post-hoc EMAs, then FID against the EMA length (README)
demo-ema: install
	$(PY) -m pipeline.demo --ema-sweep

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
