# fastsparse: every target sets up what it needs by itself on a fresh clone.
#   make demo   -- train a small CNN on scikit-learn's digits with SparsifyCallback
#   make test   -- notebook checks, notebook tests (nbdev), docs build, pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test nbtest docs pytest export clean-nbs

$(STAMP): pyproject.toml tools/install.sh
	bash tools/install.sh $(PYTHON) $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fastsparse.demo --out demo_out

# The test command of README.md, and what .ci/run runs.
test: $(STAMP)
	$(BIN)/python tools/check_nbs.py
	$(BIN)/python tools/docs.py execute
	$(BIN)/python tools/docs.py build
	$(BIN)/python -m pytest -q

export: $(STAMP)
	$(BIN)/nbdev-export

clean-nbs: $(STAMP)
	$(BIN)/nbdev-clean

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2

docs: $(STAMP)
	$(BIN)/python tools/docs.py execute
	$(BIN)/python tools/docs.py build

pytest: $(STAMP)
	$(BIN)/python -m pytest -q
