# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the package with the pinned
# versions of constraints.txt; the install is redone only when those files change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m learn2defend demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
