# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv (first time), installs sslkit, runs `sslkit demo`
#   make test   -> creates .venv (first time), installs sslkit[dev], runs pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sslkit-installed

# PyTorch is installed first, as a pinned pair, so that sslkit's own (looser) torch
# requirement is already met and pip never pulls a second multi-GB build. Override for
# another CUDA/CPU build, e.g.  make demo TORCH="torch==2.9.1 torchvision==0.24.1"
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sslkit demo

test: $(STAMP)
	$(VENV)/bin/pytest

clean-demo:
	rm -rf runs/demo shards/demo
