# The commands of the README: `make demo`, `make test`, `make test-fast` and `make lint`.
# Each creates the virtual environment .venv when it is missing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/finegrain demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The quick loop: everything but the slow, real-data and browser tests (under 2 minutes on two cores).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow and not realdata and not browser"

# ruff (lint and format check) and mypy, as CI runs them before the tests.
lint: $(STAMP)
	VENV=$(VENV) tools/lint.sh

clean-venv:
	rm -rf $(VENV)
