# The two commands of the README:
#   make demo   -- build the environment if needed, then run tanuki end to end on the bundled sample data
#   make test   -- build the environment if needed, then run the test suite
# Both create .venv (Python 3.11) when it is missing, install the CPU build of torch, then tanuki.
# GPU users: install your CUDA build of torch into the venv first; `make` keeps what is installed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
STAMP  := $(VENV)/.tanuki-installed

.PHONY: demo test install clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

clean-demo:
	rm -rf demo_out
