# One-command set-up: every target creates (or reuses) the virtual environment and installs the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# The demo command (README): the whole pipeline on Fashion-MNIST, everything under demo-out/.
DEMO_ARGS ?=
demo: setup
	$(PY) scripts/demo.py --out demo-out $(DEMO_ARGS)

# The test command (README): unit + integration tests, the slow multi-process ones included.
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Also the full-size presets (minutes and GBs of memory).
test-all: setup
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
