"""SIGTERM at any moment of any mode, from the program's first line: exit status 75,
WORKDIR/PREEMPTED, and the same command resumes to the uninterrupted result."""
import json
import signal
import subprocess
import time

import pytest

from care_jax import run_safety
from care_jax.evaluation import linear
from tests.conftest import ROOT, tiny_run_args
from tests.test_linear_eval import eval_config, main_args


def terminated_early(args, after_seconds):
  """Runs `args`, sends SIGTERM after `after_seconds` (while Python still imports JAX, or
  sets up), and returns (exit status, stderr)."""
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  time.sleep(after_seconds)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


def run(args):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", [
    pytest.param("pretrain", marks=pytest.mark.slow),  # ~130 s: two runs of the trainer
    "linear_eval"])
def test_sigterm_during_startup_exits_75_and_the_rerun_completes(
    tmp_path, image_folder, pretrained_workdir, mode):
  if mode == "pretrain":
    args = tiny_run_args(image_folder, tmp_path, "--config.num_train_steps=6")
  else:
    args = main_args(image_folder, pretrained_workdir, tmp_path,
                     "--config.linear_eval.num_epochs=2",
                     "--config.linear_eval.global_batch_size=8")
  status, stderr = terminated_early(args, after_seconds=1.0)
  assert status == run_safety.EXIT_RERUN == 75, stderr[-3000:]
  assert "Traceback" not in stderr and "(exit status 75)" in stderr
  # The phase it hit: before the first step (JAX takes seconds to load), so pretraining
  # stops at its first step, and linear evaluation while it embeds the training split,
  # before its first step (nothing to save).
  phase = ("saved the checkpoint of step 1;" if mode == "pretrain"
           else "nothing of this stage needed saving")
  assert (tmp_path / "PREEMPTED").read_text().startswith(f"Stopped by SIGTERM: {phase}"), \
      stderr[-3000:]
  out = run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  if mode == "linear_eval":
    assert json.loads((tmp_path / "results.json").read_text())["history"][-1]["epoch"] == 2


def test_a_stop_while_linear_evaluation_embeds_the_split_loses_nothing(
    tmp_path, image_folder, pretrained_workdir):
  """The cached-features path embeds the whole train split before its first epoch: a stop
  there saves nothing (there is nothing yet) and the rerun gives the uninterrupted result."""
  config = eval_config(image_folder, pretrained_workdir, augment=False, num_epochs=2)
  want = linear.evaluate(config, str(tmp_path / "whole"))
  safety = run_safety.RunSafety()
  safety.request()  # as SIGTERM does, before the first batch is embedded
  with pytest.raises(run_safety.Stopped, match="nothing of this stage needed saving"):
    linear.evaluate(config, str(tmp_path / "stopped"), safety)
  assert not (tmp_path / "stopped" / "checkpoints").exists() or not any(
      (tmp_path / "stopped" / "checkpoints").iterdir())
  assert linear.evaluate(config, str(tmp_path / "stopped")) == want
