# `make pretrain` and `make test` each create .venv when missing, install the project, then run.
# torch and torchvision come first and together: torchvision from the registry needs the matching (CUDA) torch build,
# which also runs on CPU-only machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: pretrain test clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) pretrain.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
