# Two entry points, both self-contained on a fresh machine:
#   make demo   create .venv if missing, install, run the embedded default job
#   make test   create .venv if missing, install, run the test suite (GPU tests skip without CUDA)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tp-reload-installed
# Pinned here, not in pyproject: 2.13.0 resolves to the CPU wheel on this machine and in CI,
# where an unpinned torch would pull gigabytes of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tp-reload demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
