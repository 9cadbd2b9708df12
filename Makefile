# Set-up and everyday commands. `make demo` and `make test` do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The reference prior (oracle for parity tests) is installed without its training dependencies.
ORACLE := dalle2-pytorch==0.11.5

.PHONY: install demo test test-slow lint bench bench-quick serve schema clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ORACLE)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m prior.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/run.py --json benchmarks/results.json

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick --json benchmarks/results-quick.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
