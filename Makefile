# `make demo` and `make test` do all set-up: a virtual environment inside the checkout, then run.
PYTHON ?= python3
VENV ?= .venv
# Which torch to install. The default is the CPU wheel that lies on this machine's disk (fast);
# e.g. `make test TORCH_SPEC="torch==2.11.0"`, or a CUDA build from its index.
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers llmsys supports (pyproject: >=5.17,<6). `make test` also runs the model
# layer and cache tests against it, in a second environment, so both ends of the range are tested.
TRANSFORMERS_MIN ?= 5.17.0
VENV_MIN ?= .venv-min
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PY_MIN := $(VENV_MIN)/bin/python

.PHONY: install demo test test-main test-min lint bench gpu clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV_MIN)/.installed: pyproject.toml Makefile
	test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q "$(TORCH_SPEC)"
	$(PY_MIN) -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_MIN)"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/llmsys demo

test: test-min test-main

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET must be set before triton loads).
test-main: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --timeout 600 $(PYTEST_ARGS) tests

test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pytest -q -n 2 --timeout 600 tests/models tests/cache

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: $(VENV)/.installed
	$(PY) benchmarks/kernels.py --quick

# On a CUDA machine with everything installed: GPU tests + GPU benchmarks into results/gpu.
gpu:
	bash benchmarks/gpu/run_all.sh results/gpu

clean:
	rm -rf $(VENV) $(VENV_MIN) build dist src/*.egg-info
