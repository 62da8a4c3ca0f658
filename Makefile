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

.PHONY: run test venv bench clean

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

run: $(STAMP)
	$(VENV)/bin/archlab run experiments/configs/quickstart.py --out runs/quickstart --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q tests

bench: $(STAMP)
	$(VENV)/bin/archlab bench attention

clean:
	rm -rf $(VENV) runs
