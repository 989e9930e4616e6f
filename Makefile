# The two commands of the README. Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test benchmark

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/covidct demo

test: $(STAMP)
	sh Testing/install-system-packages.sh
	$(VENV)/bin/python -m pytest -q

benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/benchmark.py
