# Two commands on a fresh machine: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test test-slow gpu-smoke lock clean c-compiler

setup: $(VENV)/.installed $(FMNIST)

# requirements*.txt give the ranges care_jax works with; constraints.txt pins the exact
# versions CI last passed with (torch as its CPU build), so a fresh machine gets those.
# care_jax itself is installed editable: `import care_jax` and `python -m care_jax.main`
# work from any directory; that also compiles its one C module (setup.py), so the venv
# is remade when that changes.
$(VENV)/.installed: $(wildcard requirements*.txt) constraints.txt pyproject.toml setup.py \
		care_jax/data/_resample.c | c-compiler
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools -c constraints.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-interop.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The C module (setup.py) needs a C compiler and Python's headers: Debian's packages where
# either is missing (python3-dev: the headers of Debian's python3, the default PYTHON).
c-compiler:
	@if ! command -v cc >/dev/null || ! $(PYTHON) -c "import os, sysconfig; \
	    assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
	    2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc libc6-dev python3-dev; \
	fi

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=10 -m slow tests || [ $$? -eq 5 ]

# The GPU lease's one command (experiments/gpu_lease.py) on this CPU, in an environment
# built like the GPU machines' (gpu-runbook): Python 3.12, jax 0.11 and what those machines
# have, but no tensorflow, tfds, clu, ml-collections or dm-pix; the last two come from
# wheels/ through `pip install --no-index --no-deps --target`, as on the device. `prepare`
# fills wheels/ (and prints what a device call must carry).
PYTHON312 ?= $(firstword $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VENV ?= .venv-gpu-smoke
GPU_PACKAGES := "jax==0.11.2" "flax==0.12.10" "optax==0.2.8" orbax-checkpoint chex numpy \
	matplotlib tensorboard opencv-python-headless pillow absl-py

gpu-smoke: $(FMNIST)
	$(PYTHON312) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet $(GPU_PACKAGES)
	$(GPU_VENV)/bin/python experiments/gpu_lease.py prepare
	$(GPU_VENV)/bin/python experiments/gpu_lease.py --smoke --budget_s=1500 --out=runs/gpu_smoke

# After upgrading on purpose (pip install -U ... in the venv) and a green `make test`:
# pin what the venv now holds.
lock:
	{ echo "# The exact versions CI passed with; \`make setup\` installs with -c constraints.txt."; \
	  echo "# Regenerate with \`make lock\` after an upgrade that passed \`make test\`."; \
	  $(PY) -m pip freeze --all --exclude care_jax; } > constraints.txt

clean:
	rm -rf $(VENV) $(GPU_VENV) runs .pytest_cache
