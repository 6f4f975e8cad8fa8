# `make pretrain` and `make test` each create .venv when missing, install the project, then run.
# torch and torchvision come first and together: torchvision from the registry needs the matching (CUDA) torch build,
# which also runs on CPU-only machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: pretrain test clean-venv gpu-carry

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

# What the device tool carries to a GPU machine (README "GPU results"): wheels its image lacks, and the data archive.
gpu-carry: $(STAMP)
	mkdir -p .whl .gpu
	$(PY) -m pip wheel -q --no-deps -w .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 airbench==0.1.8 \
		lightly pytorch-lightning lightning-utilities torchmetrics hydra-core
	cp ../shared/data/cifar10-jpeg.tar.xz .gpu/

clean-venv:
	rm -rf $(VENV)
