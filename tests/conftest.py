import importlib.util
import os
import pathlib
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Many tests (and the subprocesses they start, which inherit the environment) compile the
# same tiny programs: a persistent compilation cache for the session compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="care_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def load_config(preset: str = "tiny"):
  spec = importlib.util.spec_from_file_location("care_config", ROOT / "configs" / "care.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def quick_jit(fn, *args):
  """Compiles without backend optimisation: for tests whose programs run once."""
  import jax
  from care_jax.training.pretraining import FAST_COMPILE
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
