"""experiments/gpu_lease.py's arithmetic: stage windows that fit one lease, and epochs set
from the measured step rate so that the pretraining's schedule completes. (The command
itself runs end to end in `make gpu-smoke`, in a GPU-like Python 3.12 environment.)"""
import importlib.util

from tests.conftest import ROOT


def gpu_lease():
  spec = importlib.util.spec_from_file_location("gpu_lease", ROOT / "experiments" /
                                                "gpu_lease.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_stages_fit_nine_minutes_in_order():
  lease = gpu_lease()
  ends = [lease.WINDOWS[s] for s in ("env", "fmnist", "r50", "extras")]
  assert ends == sorted(ends) and ends[-1] == 540  # 9 minutes, under the tool's 10
  fmnist = (lease.FMNIST_CALIBRATION_S + lease.FMNIST_PRETRAIN_S + lease.FMNIST_PROBES_S
            + lease.FMNIST_DRAWINGS_S)
  assert fmnist <= lease.WINDOWS["fmnist"] - lease.WINDOWS["env"]


def test_epochs_fit_the_pretraining_share():
  lease = gpu_lease()
  # 30,000 pairs/s for 200 s at the margin: 0.6 x 6e6 pairs = 60 epochs of 60,000.
  assert lease.epochs_for(30000, 200) == 60
  assert lease.epochs_for(1e6, 200) == 100  # never beyond the preset's 100
  assert lease.epochs_for(10, 200) == 1  # at least one
  epochs = lease.epochs_for(12345, 185)
  assert epochs * lease.FMNIST_TRAIN_EXAMPLES <= 12345 * lease.RATE_MARGIN * 185
