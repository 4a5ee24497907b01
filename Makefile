# Two commands on a fresh machine: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test test-slow lock clean

setup: $(VENV)/.installed $(FMNIST)

# requirements*.txt give the ranges care_jax works with; constraints.txt pins the exact
# versions CI last passed with (torch as its CPU build), so a fresh machine gets those.
# care_jax itself is installed editable: `import care_jax` and `python -m care_jax.main`
# work from any directory.
$(VENV)/.installed: $(wildcard requirements*.txt) constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools -c constraints.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-interop.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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

# After upgrading on purpose (pip install -U ... in the venv) and a green `make test`:
# pin what the venv now holds.
lock:
	{ echo "# The exact versions CI passed with; \`make setup\` installs with -c constraints.txt."; \
	  echo "# Regenerate with \`make lock\` after an upgrade that passed \`make test\`."; \
	  $(PY) -m pip freeze --all --exclude care_jax; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
