"""The compiled resampler's errors name the bad box's numbers, as a ValueError, on this
Python and on 3.12: PyErr_Format has no %g (3.11 printed the format string itself, 3.12
raises SystemError), so the C formats the numbers first."""
import glob
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from care_jax.data import views

SOURCE = pathlib.Path(__file__).resolve().parents[1] / "care_jax" / "data" / "_resample.c"
MESSAGE = "box (3, 3, 3, 3) must be a non-empty window of the 10x10 image"


def test_a_bad_box_is_a_value_error_with_its_numbers():
  if views._resample is None:
    pytest.skip("care_jax/data/_resample.c was not built (test_resample.py says why)")
  image, out = np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)
  with pytest.raises(ValueError) as error:
    views._resample.resize(image, out, (3.0, 3.0, 3.0, 3.0))
  assert str(error.value) == MESSAGE
  with pytest.raises(ValueError, match=r"box \(0\.5, 0, 20, 10\) must be .* 10x10 image"):
    views._resample.resize(image, out, (0.5, 0.0, 20.0, 10.0))


def python312():
  """A python3.12 that runs: pyenv's shim on PATH fails where 3.12 is not the chosen
  version, so pyenv's own copies are tried too."""
  root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
  candidates = [shutil.which("python3.12")]
  candidates += sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")))
  for candidate in filter(None, candidates):
    try:
      subprocess.run([candidate, "-c", "import sysconfig"], check=True, capture_output=True,
                     timeout=30)
    except (OSError, subprocess.SubprocessError):
      continue
    return candidate
  return None


# Buffers without numpy (3.12 may have none): memoryviews shaped as uint8 images.
SCRIPT_312 = """
import sys
sys.path.insert(0, sys.argv[1])
import _resample
image = memoryview(bytearray([7] * 300)).cast("B", [10, 10, 3])
out = memoryview(bytearray(75)).cast("B", [5, 5, 3])
_resample.resize(image, out, (0.0, 0.0, 10.0, 10.0))
assert bytes(out) == bytes([7] * 75), bytes(out)
try:
  _resample.resize(image, out, (3.0, 3.0, 3.0, 3.0))
except Exception as error:
  print(type(error).__name__ + ": " + str(error))
else:
  print("no error")
"""


def test_a_bad_box_is_a_value_error_with_its_numbers_on_python_312(tmp_path):
  """Compiled here against 3.12's headers, where a bad format string is a SystemError."""
  python = python312()
  if python is None:
    pytest.skip("no python3.12 runs here (neither on PATH nor in pyenv's versions)")
  compiler = shutil.which("cc")
  if compiler is None:
    pytest.skip("no C compiler (cc) to build _resample.c for python3.12")
  config = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['include']); "
                     "print(sysconfig.get_config_var('EXT_SUFFIX'))"],
      check=True, capture_output=True, text=True, timeout=30).stdout.split("\n")
  include, suffix = config[0], config[1]
  if not os.path.exists(os.path.join(include, "Python.h")):
    pytest.skip(f"python3.12 has no headers ({include}/Python.h) to build _resample.c")
  built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", f"-I{include}", str(SOURCE),
                          "-o", str(tmp_path / f"_resample{suffix}")], capture_output=True,
                         text=True, timeout=120)
  assert built.returncode == 0, built.stderr
  result = subprocess.run([python, "-c", SCRIPT_312, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == f"ValueError: {MESSAGE}"
