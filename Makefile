# `make train` and `make test` work on a fresh clone: each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Use the shared offline copy of MNIST when it is beside the repo; elsewhere torchvision downloads it.
SHARED_MNIST := $(abspath ../shared/data/mnist)
export DLAB_DATA_DIR ?= $(if $(wildcard $(SHARED_MNIST)/MNIST),$(SHARED_MNIST),$(CURDIR)/data)

.PHONY: train test bench lint install
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

train: $(STAMP)  ## train the default model (experiment=mnist_cpu); pass overrides with ARGS="..."
	$(VENV)/bin/dlab-train $(ARGS)

# The browser tests (tests/commands/test_demo.py) drive Debian's chromium; installed here when missing
# (as root), never downloaded by Playwright. Without it those tests fail and say how to install it.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null || echo "could not install chromium (apt-get install -y chromium as root): the browser tests will fail"

test: $(STAMP) $(CHROMIUM)   ## the whole suite (what CI runs) on two pytest-xdist workers; ARGS="-n 0 ..." runs in one process
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -n 2 --dist loadgroup $(ARGS)

bench: $(STAMP)  ## speed benchmarks on this machine -> benchmarks/results/*.json; CKPT=<run> adds sampling
	$(VENV)/bin/python benchmarks/train_throughput.py
	$(VENV)/bin/python benchmarks/loop_overhead.py
	$(if $(CKPT),$(VENV)/bin/python benchmarks/sampling.py --ckpt $(CKPT),@echo "sampling: make bench CKPT=<run folder or .ckpt>")

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
