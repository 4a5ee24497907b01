# Two commands on a fresh machine: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed $(FMNIST)

$(VENV)/.installed: requirements.txt requirements-interop.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-interop.txt
	touch $@

# Real Fashion-MNIST, from Debian's package (no internet needed at run time).
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

demo: setup
	$(PY) -m care_jax.demo --workdir=runs/demo

# The tests are mostly XLA compilation, one core each: one pytest worker per core, at most 4.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=10 -m "not slow" tests

# Tests marked slow (pytest exits 5 when none is marked: not a failure).
test-slow: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow tests || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) runs .pytest_cache
