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

# Test files run side by side on TEST_WORKERS processes (pytest-xdist; a file stays on one, so its module fixtures
# are built once); TEST_WORKERS=0 runs them in this process. The 15 slowest tests are listed at the end (the CI budget).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(ARGS)

# What the device tool carries to a GPU machine (docs/performance.md): the data archive, and pinned wheels of what its
# image lacks (it has torch, torchvision, timm, pytest, pytorch-lightning, torchmetrics, lightning-utilities, ...).
# All are pure Python, so this machine's python3 builds them; no virtual environment is needed or touched.
SHARED ?= ../shared
CARRY_WHEELS := omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 hydra-core==1.3.8 airbench==0.1.8 lightly==1.6.0
gpu-carry:
	rm -rf .whl && mkdir -p .whl .gpu
	$(PYTHON) -m pip wheel -q --no-deps --no-cache-dir -w .whl $(CARRY_WHEELS)
	cp $(SHARED)/data/cifar10-jpeg.tar.xz .gpu/
	@ls .whl; du -ch .whl .gpu | tail -1 | sed 's/total/carried in all (the limit is 64 MiB with the working tree)/'

clean-venv:
	rm -rf $(VENV)
