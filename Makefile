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

.PHONY: demo test lint install browser clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sslkit demo

# The report test renders report.html in headless Chromium (Debian's package). Installed here
# when missing and this is a root shell with apt-get; otherwise that one test says how to add it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)); } || \
	  echo "note: no Chromium; the report rendering test will be skipped (install Debian's chromium)."

test: $(STAMP) browser
	$(VENV)/bin/pytest

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check sslkit tests bench

clean-demo:
	rm -rf runs/demo shards/demo
