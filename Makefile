# seqebm: `make demo` and `make test` work on a fresh machine with Python 3.10+ and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch first, pinned to the local CPU wheel, so that the project's `torch>=2.4`
# is already satisfied and pip does not pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqebm demo

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

bench: $(STAMP)
	@set -e; for b in benchmarks/[!_]*.py; do \
		[ -f "$$b" ] || continue; echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
