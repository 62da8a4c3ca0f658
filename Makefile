# `make run` and `make test` bootstrap .venv with a Python >= 3.12 found on this machine.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed

# Interpreter search: $(PYTHON) if given, then python3.13/python3.12 on PATH,
# then pyenv's installed versions, then python3 if it is new enough.
find_python = $(shell \
  for c in "$(PYTHON)" python3.13 python3.12 $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV) python3; do \
    [ -n "$$c" ] || continue; \
    command -v "$$c" >/dev/null 2>&1 || continue; \
    "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null && { command -v "$$c"; break; }; \
  done)

.PHONY: run test venv bench clean aot-venv aot-test hf-venv hf-fixtures

$(STAMP): pyproject.toml
	@PY="$(find_python)"; \
	if [ -z "$$PY" ]; then \
	  echo "error: archlab needs Python >= 3.12 (jax >= 0.11 requires it)."; \
	  echo "  Looked for: \$$PYTHON, python3.13, python3.12 on PATH, ~/.pyenv/versions/3.12+, python3."; \
	  echo "  Install one (e.g. 'pyenv install 3.12') or run: make PYTHON=/path/to/python3.12 test"; \
	  exit 1; \
	fi; \
	echo "Creating $(VENV) with $$PY ($$($$PY --version))"; \
	[ -x $(VENV)/bin/python ] || "$$PY" -m venv $(VENV); \
	$(VENV)/bin/python -m pip install -q --upgrade pip && \
	$(VENV)/bin/python -m pip install -q -e '.[test]' && touch $(STAMP)

venv: $(STAMP)

# Deviceless compile checks (TPU via libtpu, GPU via the CUDA plugin, no accelerator
# needed) live in their own venv: the plugins are large and `make test` does not need them.
AOT_VENV := .venv-aot
AOT_STAMP := $(AOT_VENV)/.installed

$(AOT_STAMP): pyproject.toml
	@PY="$(find_python)"; \
	if [ -z "$$PY" ]; then echo "error: archlab needs Python >= 3.12 (see 'make test')"; exit 1; fi; \
	echo "Creating $(AOT_VENV) with $$PY ($$($$PY --version))"; \
	[ -x $(AOT_VENV)/bin/python ] || "$$PY" -m venv $(AOT_VENV); \
	$(AOT_VENV)/bin/python -m pip install -q --upgrade pip && \
	$(AOT_VENV)/bin/python -m pip install -q -e '.[aot,test]' && touch $(AOT_STAMP)

aot-venv: $(AOT_STAMP)

aot-test: $(AOT_STAMP)
	JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 $(AOT_VENV)/bin/python -m pytest -n 2 -q tests_aot

# HuggingFace golden fixtures (tests/fixtures/hf/): torch + transformers in their own venv,
# never in $(VENV); tests and CI read the committed fixtures with safetensors/numpy only.
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.installed

$(HF_STAMP): pyproject.toml
	@PY="$(find_python)"; \
	if [ -z "$$PY" ]; then echo "error: archlab needs Python >= 3.12 (see 'make test')"; exit 1; fi; \
	echo "Creating $(HF_VENV) with $$PY ($$($$PY --version))"; \
	[ -x $(HF_VENV)/bin/python ] || "$$PY" -m venv $(HF_VENV); \
	$(HF_VENV)/bin/python -m pip install -q --upgrade pip && \
	$(HF_VENV)/bin/python -m pip install -q -e '.[hf]' && touch $(HF_STAMP)

hf-venv: $(HF_STAMP)

hf-fixtures: $(HF_STAMP)
	CUDA_VISIBLE_DEVICES= $(HF_VENV)/bin/python tools/make_hf_fixtures.py --out tests/fixtures/hf

run: $(STAMP)
	$(VENV)/bin/archlab run experiments/configs/quickstart.py --out runs/quickstart --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q tests

bench: $(STAMP)
	$(VENV)/bin/archlab bench attention

clean:
	rm -rf $(VENV) $(AOT_VENV) $(HF_VENV) runs
