# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the package with the exact versions of
# constraints.txt; `make demo` without the test tools, `make test` adds them (the extra
# `test`: pytest, hypothesis, ruff, torchattacks, tensorboard). Each install is redone only
# when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m learn2defend demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests

test: $(TEST_STAMP) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
