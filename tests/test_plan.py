"""The run plan: its memory model against the GPU figures it is calibrated on, its exit
status and one-line refusal, and the trainer's refusal before the first step."""
import json
import os
import subprocess
import sys

import pytest

from care_jax import plan, train
from care_jax.errors import UserError
from conftest import ROOT, load_config

GiB = 2**30


@pytest.fixture(scope="module")
def r50_bf16():
  config = load_config("r50_100ep")
  config.precision = "bfloat16"
  return config, plan.trace(config, num_classes=1000)


def test_reference_residuals_are_those_of_todays_r50_step(r50_bf16):
  """The constant the model scales by must be today's R50's, or every estimate is off."""
  _, networks = r50_bf16
  assert networks.residuals_per_pair == plan.REFERENCE_RESIDUALS["bfloat16"]


@pytest.mark.parametrize("pairs, measured_gib", [(128, 12.9), (256, 25.0)])
def test_step_memory_matches_the_h100_measurements(r50_bf16, pairs, measured_gib):
  """One H100, bfloat16, R50 at 224 px (2026-11-27): the issue's bar is 25%."""
  config, networks = r50_bf16
  config = config.copy_and_resolve_references()
  config.global_batch_size = pairs
  step, basis = plan.device_memory(config, networks, 1, 1_281_167)["training step"]
  assert abs(step / GiB - measured_gib) / measured_gib < 0.05, (step / GiB, basis)


def test_memory_grows_with_the_per_device_batch_and_shards_with_the_devices(r50_bf16):
  config, networks = r50_bf16
  one = plan.device_memory(config, networks, 1, 1_281_167)
  eight = plan.device_memory(config, networks, 8, 1_281_167)
  # 1024 pairs on one device against 128 on each of 8: activations / 8, state the same.
  assert 7 < (one["training step"][0] - networks.state) / (
      eight["training step"][0] - networks.state) < 8.5
  # Cached linear features: 1,281,167 x 2048 x 4 bytes over 8 devices, not on each.
  cached = eight["linear, augment=False"][0] - eight["linear evaluation"][0]
  assert abs(cached - 1_281_167 * (2048 * 4 + 4) / 8) < 1e6


def test_devices_spec():
  assert plan.Devices.parse("8xV100-16GB") == plan.Devices(8, "V100", 16.0)
  assert plan.Devices.parse("h100-80GB") == plan.Devices(1, "H100", 80.0)
  with pytest.raises(UserError, match="COUNTxNAME-MEMORYGB"):
    plan.Devices.parse("8 V100s")


def _plan(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "care_jax.plan", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_batch_1024_on_one_16gb_device_in_float32_exits_2_with_one_line():
  out = _plan("--config=configs/care.py:r50_100ep", "--devices=1xV100-16GB",
              "--pairs_per_sec=100", "--json")
  assert out.returncode == 2, out.stderr[-2000:]
  report = json.loads(out.stdout)
  assert not report["fits"] and report["device_step_gib"] > 100
  assert report["failures"][0]["what"] == "training step"
  error = out.stderr.strip().splitlines()
  assert len(error) == 1 and error[0].startswith("error: training step needs"), error
  assert "fewer pairs per device (1024 now" in error[0]


def test_tiny_run_fits_and_prints_every_section():
  out = _plan("--config=configs/care.py:tiny", "--devices=8xH100-80GB")
  assert out.returncode == 0, out.stderr[-2000:]
  for section in ("per device (60.0 GiB usable)", "host", "disk", "input", "time", "fits"):
    assert f"\n{section}" in out.stdout, out.stdout


def test_trainer_refuses_a_step_that_cannot_fit_before_the_first_step(tmp_path, monkeypatch,
                                                                      fmnist_data_dir):
  config = load_config("r50_100ep")
  config.data.update(name="fashion_mnist", data_dir=fmnist_data_dir, eval_split="test")
  monkeypatch.setattr(plan, "device_limit_bytes", lambda: int(0.75 * 16 * GiB))
  with pytest.raises(UserError, match=r"training step would need about \d+\.\d GiB"):
    train.pretrain(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # nothing was started
