import os
import pathlib
import tempfile

import pytest

from care_jax import run_safety  # imports no JAX: the settings below come first

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One scratch folder per test run, made by the process that starts the run (pytest-xdist's
# workers, started after this import, inherit its name) and removed when that process ends,
# so runs leave nothing in the temporary directory.
_SCRATCH_VAR = "CARE_JAX_TEST_SCRATCH"
_OWNS_SCRATCH = _SCRATCH_VAR not in os.environ
if _OWNS_SCRATCH:
  os.environ[_SCRATCH_VAR] = tempfile.mkdtemp(prefix="care_jax_tests_")
SCRATCH = os.environ[_SCRATCH_VAR]

# Many tests (and the subprocesses they start, which inherit the environment) compile the
# same tiny programs: a persistent compilation cache for the run compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(SCRATCH, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
  if _OWNS_SCRATCH:
    import shutil
    shutil.rmtree(SCRATCH, ignore_errors=True)


def load_config(preset: str = "tiny"):
  from care_jax import cli
  return cli.load_config(preset=preset)


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def run_on_devices(script: str, devices: int, collective_timeout: int = 600) -> dict:
  """Runs tests/scripts/<script> on `devices` simulated CPU devices; the JSON of its last
  line."""
  import json
  import subprocess
  import sys
  # XLA:CPU aborts a collective whose devices arrive over 40 s apart, which simulated devices
  # sharing two busy cores can do (the full-count rehearsal hit it, docs/scale.md).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       f"--xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout}")
  out = subprocess.run([sys.executable, f"tests/scripts/{script}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def quick_compile(fn, *args):
  """`fn` jitted for these arguments' shapes, compiled without backend optimisation: for
  tests, whose programs run a few times at most."""
  import jax
  from care_jax.training.pretraining import FAST_COMPILE
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def quick_jit(fn, *args):
  """Compiles `fn` as quick_compile does and calls it once on `args`."""
  return quick_compile(fn, *args)(*args)


@pytest.fixture(scope="session")
def fmnist_data_dir():
  """A data dir with Fashion-MNIST prepared from Debian's files, once per test run (the
  preparation holds a file lock, so parallel workers wait for one another)."""
  from care_jax.data import sources
  data_dir = os.path.join(SCRATCH, "tfds")
  sources.tfds_version_dir("fashion_mnist", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
  """root/{train,test}/{cat,dog}/*.jpg: 32 + 8 small JPEGs per class."""
  from care_jax.data import synthetic
  root = tmp_path_factory.mktemp("images")
  synthetic.write_image_folder(str(root), splits={"train": 32, "test": 8}, height=24, width=24)
  return str(root)


# Six colours (RGB gains) that a linear classifier of pixels or of features tells apart.
SEPARABLE_TINTS = ((1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.2, 0.2, 1.0), (1.0, 1.0, 0.2),
                   (0.2, 1.0, 1.0), (1.0, 0.2, 1.0))


@pytest.fixture(scope="session")
def separable_folder(tmp_path_factory):
  """root/{train,test}/{class0..class5}/*.jpg: 16 + 8 natural images per class, each class
  tinted its own colour (SEPARABLE_TINTS): linear probes must reach well above chance."""
  import numpy as np
  import PIL.Image
  from care_jax.data import synthetic
  root = tmp_path_factory.mktemp("separable")
  rng = np.random.default_rng(5)
  for split, count in (("train", 16), ("test", 8)):
    for k, tint in enumerate(SEPARABLE_TINTS):
      folder = root / split / f"class{k}"
      folder.mkdir(parents=True)
      for i in range(count):
        image = synthetic.natural_image(rng, 24, 24) * np.asarray(tint)
        PIL.Image.fromarray(image.astype(np.uint8)).save(folder / f"img{i}.jpg", quality=95)
  return str(root)


@pytest.fixture(scope="session")
def pretrained_workdir(tmp_path_factory, image_folder):
  """A tiny pretraining run (4 steps at 16 px) on the image folder."""
  from care_jax import train
  workdir = tmp_path_factory.mktemp("pretrained")
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder)
  train.pretrain(config, str(workdir))
  return str(workdir)


def tiny_run_args(image_folder: str, workdir, *extra: str) -> list:
  """Command line of a tiny pretraining run on the image folder."""
  import sys
  return [sys.executable, "-m", "care_jax.main", "--config=configs/care.py:tiny",
          f"--workdir={workdir}", "--config.data.name=image_folder",
          f"--config.data.folder_root={image_folder}", *extra]


STATE_PARTS = ("online_params", "online_stats", "target_params", "target_stats", "opt_state")


def relative_differences(a, b) -> dict:
  """||a - b|| / ||a|| for each part of two TrainStates.

  Parts, not single leaves: the biases of Dense layers that feed a BatchNorm have a zero
  true gradient, so their momentum buffers hold only rounding noise (~1e-7), which any
  change of summation order (devices, processes) changes completely.
  """
  import jax
  import numpy as np
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  return {part: float(np.linalg.norm(flat(getattr(a, part)) - flat(getattr(b, part)))
                      / np.linalg.norm(flat(getattr(a, part))))
          for part in STATE_PARTS}


class StopAt(run_safety.RunSafety):
  """A stop request as SIGTERM makes it, at a chosen point: after step `step`
  (between steps), or with during_evaluation at the first check between the batches of an
  evaluation after that step."""

  def __init__(self, step: int, during_evaluation: bool = False):
    super().__init__()
    self._at, self._during_evaluation, self._seen, self._done = step, during_evaluation, 0, False

  def stop_source(self, step=None, mgr=None):
    if step is not None:
      self._seen = step
    wanted = (step is None and self._seen == self._at if self._during_evaluation
              else step == self._at)
    if wanted and not self._done:
      self._done = True
      return run_safety.SIGTERM
    return None
